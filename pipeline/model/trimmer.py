"""Stage 2, Trimmer: run the prompt to the first cross-attention layer (which sees every visual token), score
and select tokens there, and compute every cross-attention layer's K/V from the kept tokens only."""


from dataclasses import dataclass

import torch

from pipeline.config import TrimConfig
from pipeline.model.layers import (
    attend,
    cross_finish,
    cross_kv,
    cross_q,
    project_cross_kv,
    self_finish,
    self_qkv,
)
from pipeline.model.loaded import LoadedModel
from pipeline.model.placement import module_device, moved
from pipeline.model.selection import ROW_CHUNK, chunk_scores, importance_order, select_tokens, topk_count
from pipeline.model.trimmer_cache import TrimmerPrefixCache
from pipeline.types import (
    CROSS_KINDS,
    CrossKV,
    DecodeRequest,
    ImageState,
    KeptFeatures,
    PreparedPrompt,
    ResumeState,
    VisualFeatures,
)


@dataclass
class _Slot:
    """One request of a batch: where its computed rows sit among the batch's concatenated rows, and who sees what (as
    HF expands the processor's (S, images, tiles) mask)."""

    rows: slice  # its computed prompt rows (start .. S) among the batch's
    start: int  # prompt rows before it are the prefix cache's (full pages of its blind prefix): not computed here
    prefix: int  # rows before the first image token (they see no image, so they get no cross-attention output)
    tokens_per_image: int
    token_visible: torch.Tensor  # (S - prefix, images * tokens_per_image) bool: which tokens each seeing row sees
    row_visibility: torch.Tensor  # (S, images) bool: which images each row sees
    valid: torch.Tensor  # (valid,) positions of its non-padding visual tokens, ascending: the only ones anyone reads

    @property
    def seeing(self) -> slice:
        """Its rows from the first image token on, among the batch's: the only ones the first cross-attention layer
        computes (a blind row gets no output, and its votes are zero)."""
        return slice(self.rows.start + self.prefix - self.start, self.rows.stop)


def _slots(prompts: list[PreparedPrompt], visuals: list[VisualFeatures], starts: list[int], dev) -> list[_Slot]:
    """Each prompt's slot, its computed rows following the previous prompt's."""
    slots, row = [], 0
    for prompt, visual, start in zip(prompts, visuals, starts):
        images, tokens_per_image, _ = visual.features.shape
        if tuple(visual.token_valid.shape) != (images, tokens_per_image):
            raise ValueError(f"visual features {tuple(visual.features.shape)} do not match token_valid "
                             f"{tuple(visual.token_valid.shape)}: (images, tokens) must be the same")
        tiles = prompt.cross_attention_mask.shape[-1]
        row_visibility = prompt.cross_attention_mask.to(dev).bool().any(dim=2)
        prefix = prompt.blind_prefix
        assert bool(row_visibility.any(dim=1)[prefix:].all()), "a row after the first image token sees no image"
        assert start <= prefix, "only blind-prefix rows are cached"
        s = len(prompt.input_ids)
        valid = visual.token_valid.to(dev).reshape(-1).nonzero().squeeze(1)
        visible = prompt.token_visible(tokens_per_image // tiles)[prefix:].to(dev)
        slots.append(_Slot(slice(row, row + s - start), start, prefix, tokens_per_image, visible, row_visibility,
                           valid))
        row += s - start
    return slots


class Trimmer:
    def __init__(self, loaded: LoadedModel, cfg: TrimConfig | None = None,
                 prefix_cache: TrimmerPrefixCache | None = None):
        """prefix_cache: the K/V of blind-prefix pages already run (None: every row is computed)."""
        self.loaded = loaded
        self.cfg = cfg or TrimConfig()
        self.text = loaded.text
        self.first = loaded.first_cross
        self.prefix_cache = prefix_cache if self.first else None  # no layer before the first cross layer: no K/V
        self.rows_computed = 0  # prompt rows run through the layers up to the first cross-attention layer

    def trim(self, prompt: PreparedPrompt, visual: VisualFeatures, cfg: TrimConfig | None = None,
             ship: str = "kv") -> DecodeRequest:
        """Select tokens; the decode request carries their K/V in every cross-attention layer (ship "kv") or their
        features, from which the decoder projects that K/V (ship "features")."""
        return self.trim_batch([prompt], [visual], [cfg], ship)[0]

    @torch.inference_mode()
    def trim_batch(self, prompts: list[PreparedPrompt], visuals: list[VisualFeatures],
                   cfgs: list[TrimConfig | None] | None = None, ship: str = "kv") -> list[DecodeRequest]:
        """trim() of several prompts (each with its own config) in one pass: their rows run as one varlen sequence
        (the rows' projections and MLPs over all rows at once; attention within each prompt's own rows), so no
        padding is computed and no mask differs from a batch of one; the per-visual-token work (K/V, attention,
        scores, selection) runs per prompt, scores summed in the same chunks. Each prompt's result is bitwise its
        batch-1 result (tests/unit/test_batched_stages.py). A prompt's blind-prefix pages in the prefix cache are
        not computed: its rows start after them, and so does its resume state (ResumeState.start)."""
        if ship not in CROSS_KINDS:
            raise ValueError(f"ship is one of {sorted(CROSS_KINDS)}, not {ship!r}")
        cfgs = [c or self.cfg for c in (cfgs or [None] * len(prompts))]
        dev = self.loaded.device
        ids = [p.input_ids.to(dev) for p in prompts]
        hashes, past = self._cached(prompts)
        slots = _slots(prompts, visuals, [0 if kv is None else kv.shape[-2] for kv in past], dev)
        feats = [v.features.reshape(-1, v.features.shape[-1]).to(dev) for v in visuals]  # (images * tokens, hidden)
        h, self_kv = self._run_to_first_cross([i[s.start :] for i, s in zip(ids, slots)], slots, past)
        self._cache(slots, hashes, self_kv)
        h_in = h
        h, scores, k, v = self._first_cross_layer(h, feats, slots, [s.token_visible for s in slots])

        kept = [self._select(scores[j], visuals[j], cfgs[j], slots[j]) for j in range(len(slots))]  # local positions
        if any(c.trim_first_layer for c in cfgs):
            # Ablation: the prompt rows that see an image read only the kept tokens there too.
            visible = []
            for slot, cfg, keep_j in zip(slots, cfgs, kept):
                keep = torch.zeros(slot.token_visible.shape[1], dtype=torch.bool, device=dev)
                keep[keep_j] = True
                visible.append(slot.token_visible & keep if cfg.trim_first_layer else slot.token_visible)
            h = self._first_cross_layer(h_in, feats, slots, visible)[0]

        # Later layers project K/V of the kept tokens only (here, or in the decoder from the shipped features). Per
        # prompt, not over the batch's kept tokens at once: a GEMM of under 4 rows takes another kernel (a kept count
        # can be that small), and hundreds of rows already keep one busy, so every prompt's K/V is its batch-1 value.
        later = [i for i in self.loaded.cross_layers if i != self.first]
        kept_feats = [f[kj] for f, kj in zip(feats, kept)]
        alone = len(slots) == 1
        out = []
        for j, (slot, visual, kj) in enumerate(zip(slots, visuals, kept)):
            if ship == "kv":
                later_kv = (project_cross_kv(self.text, later, kept_feats[j]) if later  # (later, 2, KVH, kept, hd)
                            else k[j].new_zeros((0, 2, k[j].shape[0], len(kj), k[j].shape[2])))
                local = torch.searchsorted(slot.valid, kj)  # k and v hold the valid tokens only
                first_kv = torch.stack([k[j][:, local], v[j][:, local]])[None]
                cross = CrossKV(torch.cat([first_kv, later_kv]))
            else:
                cross = KeptFeatures(kept_feats[j])
            resume = ResumeState(
                hidden=h[0, slot.rows] if alone else h[0, slot.rows].clone(),  # a batch's rows would pin all of h
                self_kv=self_kv[..., slot.rows, :] if alone else self_kv[..., slot.rows, :].clone(),
                cross=cross,
                start=slot.start,
            )
            out.append(DecodeRequest(ids[j].tolist(), self._image_state(visual, slot, kj, k[j], cfgs[j]), resume))
        return out

    def _select(self, scores: torch.Tensor, visual: VisualFeatures, cfg: TrimConfig, slot: _Slot) -> torch.Tensor:
        """One prompt's kept tokens (positions among its images' tokens), chosen per image among the valid ones;
        scores (H, its images * tokens_per_image). Stored best first (importance_order), so a sequence's least
        important kept tokens sit in its last cross pages, which shedding frees (docs/elastic.md). Several images
        are interleaved by relative rank (image i's r-th of m_i at r / m_i, ties to the earlier image): any prefix
        keeps about the same share of every image, and each image's own tokens stay best first. The order changes
        no number: cross-attention has no positions on the visual side."""
        n, dev = slot.tokens_per_image, scores.device
        kept, keys = [], []
        for i in range(visual.features.shape[0]):
            valid = visual.token_valid[i].to(dev).nonzero().squeeze(1)
            image_scores = scores[:, i * n + valid].cpu()
            local = importance_order(image_scores, select_tokens(image_scores, cfg)).to(dev)
            kept.append(i * n + valid[local])
            keys.append(torch.arange(len(local), dtype=torch.float64) / len(local))
        if len(kept) == 1:
            return kept[0]
        order = torch.sort(torch.cat(keys), stable=True).indices.to(dev)  # stable: ties to the earlier image
        return torch.cat(kept)[order]

    def _image_state(self, visual: VisualFeatures, slot: _Slot, kept: torch.Tensor, k: torch.Tensor,
                     cfg: TrimConfig) -> ImageState:
        images = visual.features.shape[0]
        kept_image = kept // slot.tokens_per_image
        visual_tokens = visual.token_valid.sum(dim=1).tolist()
        elastic = cfg.policy == "elastic"
        floor = sum(topk_count(cfg.floor_fraction, n) for n in visual_tokens) if cfg.sheddable else None
        return ImageState(
            kept_image=kept_image,
            kept_index=kept % slot.tokens_per_image,
            row_visibility=slot.row_visibility,
            visual_tokens=visual_tokens,
            kept_tokens=torch.bincount(kept_image, minlength=images).tolist(),
            # one token's K and V in every cross-attention layer
            kv_bytes_per_visual_token=len(self.loaded.cross_layers) * 2 * k.shape[0] * k.shape[2] * k.element_size(),
            tokens_per_image=slot.tokens_per_image,
            prefix_len=slot.prefix,
            floor_tokens=None if floor is None else min(floor, len(kept)),
            chosen_fraction=round(cfg.elastic_fraction(), 6) if elastic else None,
            pressure=cfg.pressure if elastic else None,
        )

    def _cached(self, prompts: list[PreparedPrompt]) -> tuple[list[list[bytes]], list[torch.Tensor | None]]:
        """Per prompt: the hash chain of its blind prefix's full pages, and the cached K/V of the longest run of them
        (layers before the first cross-attention layer, 2, KVH, cached rows, hd), or None."""
        cache, dev = self.prefix_cache, self.loaded.device
        if cache is None:
            return [[] for _ in prompts], [None for _ in prompts]
        hashes, past = [], []
        for p in prompts:
            chain = cache.hashes(p.input_ids.tolist(), p.blind_prefix, p.cache_salt)
            pages = cache.match(chain)
            cache.count(len(chain) * cache.block_size, len(pages) * cache.block_size)
            hashes.append(chain)
            past.append(torch.cat(pages, dim=-2).to(dev) if pages else None)
        return hashes, past

    def _cache(self, slots: list[_Slot], hashes: list[list[bytes]], self_kv: torch.Tensor) -> None:
        """The blind-prefix pages just computed, into the prefix cache."""
        if self.prefix_cache is None:
            return
        b = self.prefix_cache.block_size
        for slot, chain in zip(slots, hashes):
            new = chain[slot.start // b :]
            if new:
                self.prefix_cache.put(new, self_kv[..., slot.rows.start : slot.rows.start + len(new) * b, :])

    def _run_to_first_cross(self, ids: list[torch.Tensor], slots: list[_Slot], past: list[torch.Tensor | None]):
        """The layers before the first cross-attention layer over the batch's computed rows (1, rows, hidden); causal
        attention within each prompt, over its cached rows' K/V (`past`) too. Returns (h, self K/V of the computed
        rows (first, 2, KVH, rows, hd))."""
        self.rows_computed += sum(len(i) for i in ids)
        flat = torch.cat(ids)
        h = self.text.embed_tokens(flat)[None]
        positions = torch.cat([torch.arange(s.start, s.start + len(i), device=flat.device)
                               for i, s in zip(ids, slots)])[None]
        cos, sin = self.text.rotary_emb(h, positions)
        # A prompt after cached rows: row r (at position start + r) sees keys 0 .. start + r.
        masks = [None if kv is None else torch.arange(len(i), device=flat.device)[:, None] + s.start
                 >= torch.arange(s.start + len(i), device=flat.device)[None] for i, s, kv in zip(ids, slots, past)]
        self_kv, on = [], {}
        for n, layer in enumerate(self.text.layers[: self.first]):
            dev = module_device(layer)  # layers split over devices: run each where its weights are
            h = h.to(dev)
            q, k, v = self_qkv(layer, h, *moved((cos, sin), dev, on))
            scale = layer.self_attn.scaling
            out = []
            for s, kv, mask in zip(slots, past, masks):
                if kv is None:
                    out.append(attend(q[:, :, s.rows], k[:, :, s.rows], v[:, :, s.rows], scale, causal=True))
                else:
                    keys = torch.cat([kv[n, 0][None].to(dev), k[:, :, s.rows]], dim=2)
                    values = torch.cat([kv[n, 1][None].to(dev), v[:, :, s.rows]], dim=2)
                    out.append(attend(q[:, :, s.rows], keys, values, scale, mask=mask.to(dev)))
            self_kv.append(torch.stack([k[0], v[0]]).to(flat.device))
            h = self_finish(layer, h, torch.cat(out, dim=2) if len(out) > 1 else out[0])
        if not self_kv:  # the first cross-attention layer is layer 0: empty but shaped
            attn = self.text.layers[self.first].cross_attn
            return h, h.new_zeros((0, 2, attn.num_key_value_heads, len(flat), attn.head_dim))
        return h.to(flat.device), torch.stack(self_kv)

    def _first_cross_layer(self, h, feats, slots: list[_Slot], token_visible: list[torch.Tensor]):
        """HF's cross-attention layer with eager attention, so the softmax is at hand for scoring, over the rows that
        see an image (a blind row gets neither branch (Meta's reference) and casts no vote, so it passes unchanged):
        the rows' projections and MLP over the whole batch (their weights read once); each prompt's visual K/V,
        attention and scores on its own (thousands of tokens already keep a GEMM busy, and the batch's K/V in one
        tensor only grows the working set), ROW_CHUNK rows at a time from its first image token (a long prompt never
        holds (heads x rows x visual tokens) probabilities; the chunks, and so the scores' sums, do not depend on how
        much of the prefix was cached). Padding tiles' tokens are left out: every row that sees an image masks them,
        so they change nothing. Returns (h, and per prompt: per-head scores (H, its tokens; 0 at padding), k, v
        (KVH, its valid tokens, hd))."""
        layer = self.text.layers[self.first]
        home, dev = h.device, module_device(layer)
        h = h.to(dev)
        attn = layer.cross_attn
        seeing = torch.cat([torch.arange(s.seeing.start, s.seeing.stop) for s in slots]).to(dev)
        x = h[:, seeing]
        q = cross_q(layer, x)[0]  # (H, seeing rows, hd)
        out, scores, ks, vs, a = torch.empty_like(q), [], [], [], 0
        for slot, f, visible in zip(slots, feats, token_visible):
            rows = slice(a, a + slot.seeing.stop - slot.seeing.start)
            a = rows.stop
            valid = slot.valid.to(f.device)
            k, v = cross_kv(layer, f[valid].to(dev))  # (KVH, its valid tokens, hd)
            o, s = _attend_and_score(q[:, rows], k, v, visible[:, valid].to(dev), attn.num_key_value_groups,
                                     attn.scaling)
            out[:, rows] = o
            full = s.new_zeros((s.shape[0], visible.shape[1]))
            full[:, valid.to(s.device)] = s
            scores.append(full)
            ks.append(k.to(home))
            vs.append(v.to(home))
        h = h.clone()
        h[:, seeing] = cross_finish(layer, x, out[None], torch.ones(len(seeing), dtype=torch.bool, device=dev)[None])
        return h.to(home), scores, ks, vs


def _attend_and_score(q, k, v, token_visible, groups: int, scaling: float):
    """One prompt's rows that see an image: q (H, S, hd) over k, v (KVH, V, hd) -> (attention output (H, S, hd),
    scores (H, V) float32)."""
    kt, vg = k.repeat_interleave(groups, dim=0).transpose(1, 2), v.repeat_interleave(groups, dim=0)
    out, scores = torch.empty_like(q), None
    for r in range(0, q.shape[1], ROW_CHUNK):
        rows = slice(r, r + ROW_CHUNK)
        bias = torch.zeros(token_visible[rows].shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~token_visible[rows], torch.finfo(q.dtype).min)
        logits = q[:, rows] @ kt * scaling + bias  # (H, rows, V)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
        out[:, rows] = probs @ vg
        part = chunk_scores(probs, token_visible[rows])
        scores = part if scores is None else scores + part
    return out, scores

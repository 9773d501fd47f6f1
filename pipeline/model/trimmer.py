"""Stage 2, Trimmer: run the prompt to the first cross-attention layer (which sees every visual token), score
and select tokens there, and compute every cross-attention layer's K/V from the kept tokens only."""


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
from pipeline.model.selection import ROW_CHUNK, chunk_scores, select_tokens
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


class Trimmer:
    def __init__(self, loaded: LoadedModel, cfg: TrimConfig | None = None):
        self.loaded = loaded
        self.cfg = cfg or TrimConfig()
        self.text = loaded.text
        self.first = loaded.first_cross

    @torch.inference_mode()
    def trim(self, prompt: PreparedPrompt, visual: VisualFeatures, cfg: TrimConfig | None = None,
             ship: str = "kv") -> DecodeRequest:
        """Select tokens; the decode request carries their K/V in every cross-attention layer (ship "kv") or their
        features, from which the decoder projects that K/V (ship "features")."""
        if ship not in CROSS_KINDS:
            raise ValueError(f"ship is one of {sorted(CROSS_KINDS)}, not {ship!r}")
        cfg = cfg or self.cfg
        dev = self.loaded.device
        ids = prompt.input_ids.to(dev)
        h, self_kv = self._run_to_first_cross(ids)

        # Which tokens each row sees, exactly as HF expands the processor's (S, images, tiles) mask.
        images, tokens_per_image, _ = visual.features.shape
        tiles = prompt.cross_attention_mask.shape[-1]
        token_visible = prompt.token_visible(tokens_per_image // tiles).to(dev)
        row_visibility = prompt.cross_attention_mask.to(dev).bool().any(dim=2)
        feats = visual.features.reshape(images * tokens_per_image, -1)

        sees = row_visibility.any(dim=1)
        prefix = int(sees.long().argmax())  # rows after the first image token all see an image
        assert bool(sees[prefix:].all()), "a row after the first image token sees no image"
        h_in = h
        h, scores, k, v = self._first_cross_layer(h, feats, token_visible, sees)  # scores (H, images * tokens)

        kept = []
        for i in range(images):
            valid = visual.token_valid[i].nonzero().squeeze(1)
            local = select_tokens(scores[:, i * tokens_per_image + valid].cpu(), cfg).to(dev)
            kept.append(i * tokens_per_image + valid[local])
        kept = torch.cat(kept)
        if cfg.trim_first_layer:  # ablation: the prompt rows that see an image read only the kept tokens there too
            keep = torch.zeros(feats.shape[0], dtype=torch.bool, device=dev)
            keep[kept] = True
            h = self._first_cross_layer(h_in, feats, token_visible & keep, sees)[0]

        # Later layers project K/V of the kept tokens only (here, or in the decoder from the shipped features). The
        # blind prefix (if any) also reads the padding tiles' tokens there (HF shows them to it and trimming never
        # drops them): the decoder projects those from their features, layer by layer.
        if ship == "kv":
            later = [i for i in self.loaded.cross_layers if i != self.first]
            later_kv = (project_cross_kv(self.text, later, feats[kept]) if later  # (later, 2, KVH, kept, hd)
                        else k.new_zeros((0, 2, k.shape[0], len(kept), k.shape[2])))
            cross = CrossKV(torch.cat([torch.stack([k[:, kept], v[:, kept]])[None], later_kv]))
        else:
            cross = KeptFeatures(feats[kept])
        padding = (~visual.token_valid.to(dev).reshape(-1)).nonzero().squeeze(1) if prefix else kept[:0]
        kept_image = kept // tokens_per_image
        image = ImageState(
            kept_image=kept_image,
            kept_index=kept % tokens_per_image,
            row_visibility=row_visibility,
            visual_tokens=visual.token_valid.sum(dim=1).tolist(),
            kept_tokens=torch.bincount(kept_image, minlength=images).tolist(),
            # one token's K and V in every cross-attention layer
            kv_bytes_per_visual_token=len(self.loaded.cross_layers) * 2 * k.shape[0] * k.shape[2] * k.element_size(),
            tokens_per_image=tokens_per_image,
            prefix_len=prefix,
        )
        resume = ResumeState(
            hidden=h[0],
            # (first, 2, KVH, S, hd); empty but shaped when the first cross-attention layer is layer 0
            self_kv=torch.stack(self_kv) if self_kv else h.new_zeros((0, 2, k.shape[0], len(ids), k.shape[2])),
            cross=cross,
            padding_features=feats[padding],
            padding_positions=padding,
        )
        return DecodeRequest(ids.tolist(), image, resume)

    def _run_to_first_cross(self, ids: torch.Tensor):
        h = self.text.embed_tokens(ids)[None]
        cos, sin = self.text.rotary_emb(h, torch.arange(len(ids), device=ids.device)[None])
        self_kv, on = [], {}
        for layer in self.text.layers[: self.first]:
            dev = module_device(layer)  # layers split over devices: run each where its weights are
            h = h.to(dev)
            q, k, v = self_qkv(layer, h, *moved((cos, sin), dev, on))
            self_kv.append(torch.stack([k[0], v[0]]).to(ids.device))
            h = self_finish(layer, h, attend(q, k, v, layer.self_attn.scaling, causal=True))
        return h.to(ids.device), self_kv

    def _first_cross_layer(self, h, feats, token_visible, row_sees_image):
        """HF's cross-attention layer with eager attention, so the softmax is at hand for scoring; ROW_CHUNK
        prompt rows at a time, so a long prompt never holds (heads x rows x visual tokens) probabilities.
        Returns (h, per-head scores (H, V), k, v)."""
        layer = self.text.layers[self.first]
        home, dev = h.device, module_device(layer)
        h, feats, token_visible, row_sees_image = (t.to(dev) for t in (h, feats, token_visible, row_sees_image))
        attn = layer.cross_attn
        q = cross_q(layer, h)[0]  # (H, S, hd)
        k, v = cross_kv(layer, feats)  # (KVH, V, hd)
        groups = attn.num_key_value_groups
        kt, vg = k.repeat_interleave(groups, dim=0).transpose(1, 2), v.repeat_interleave(groups, dim=0)
        # Rows that see no image get an all-zero mask (a uniform average), as HF's mask preparation gives them.
        allowed = token_visible | ~row_sees_image[:, None]
        out, scores = torch.empty_like(q), None
        for r in range(0, q.shape[1], ROW_CHUNK):
            rows = slice(r, r + ROW_CHUNK)
            bias = torch.zeros(allowed[rows].shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~allowed[rows], torch.finfo(q.dtype).min)
            logits = q[:, rows] @ kt * attn.scaling + bias  # (H, rows, V)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
            out[:, rows] = probs @ vg
            part = chunk_scores(probs, token_visible[rows])
            scores = part if scores is None else scores + part
        h = cross_finish(layer, h, out[None], row_sees_image[None])
        return h.to(home), scores, k.to(home), v.to(home)

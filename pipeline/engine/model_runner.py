"""Runs the text decoder over sequences whose K/V lives in the engine's KV pages: the prefill (resumed after the
first cross-attention layer from a ResumeState, or from layer 0 for a text-only prompt) and the batched
decode step, where projections and MLPs run on the whole batch and attention runs in the device's backend."""

import torch

from pipeline.engine.attention import attention_backend
from pipeline.engine.cuda_graphs import DecodeGraphs
from pipeline.engine.kv_cache import KVCache
from pipeline.engine.sequence import Sequence
from pipeline.engine.step_batch import DecodeBatch, decode_batch
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
from pipeline.model.placement import moved
from pipeline.types import CrossKV, ImageState, ResumeState


class ModelRunner:
    def __init__(self, loaded: LoadedModel, kv: KVCache):
        self.loaded = loaded
        self.kv = kv
        self.text = loaded.text
        self.lm_head = loaded.model.lm_head
        self.cross = set(loaded.cross_layers)
        self.first = loaded.first_cross
        self.device = loaded.device
        self.attn = attention_backend(kv, loaded.device)
        self.graphs: DecodeGraphs | None = None  # captured decode steps, when the engine turns CUDA graphs on
        # Layers split over devices: each layer runs where its weights are (hidden state moved at the boundary).
        self.layer_devices = [loaded.devices[p] for p in loaded.placement]
        self.last = loaded.devices[-1]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """On the first device, where sampling's generator lives."""
        return self.lm_head(self.text.norm(h[:, -1].to(self.last))).float().to(self.device)

    @torch.inference_mode()
    def prefill(self, seq: Sequence, resume: ResumeState | None) -> torch.Tensor:
        """Fill the sequence's K/V for its prompt (from `resume`, the sequence's resume state, when it has an
        image); return the logits of the next token (V,)."""
        n = seq.prompt_len
        table, image, cache = seq.pages, seq.image, self.kv
        slots = table.self_slots(0, n)
        if image is None:
            h, start = self.text.embed_tokens(torch.tensor(seq.prompt_token_ids, device=self.device))[None], 0
        else:  # resume every row after the first cross-attention layer
            h, start = resume.hidden[None].to(self.loaded.dtype), self.first + 1
            # (layers, 2, KVH, n, hd) -> each layer's pages (n, 2, KVH, hd), on the layer's device
            for i in range(self.first):
                view = cache.self_layer(cache.kv_layer[i])
                view[slots.to(view.device)] = resume.self_kv[i].permute(2, 0, 1, 3).to(view.device, view.dtype)
            if isinstance(resume.cross, CrossKV):
                cross = resume.cross.kv
            else:  # the kept tokens' features: project every cross-attention layer's K/V here
                cross = project_cross_kv(self.text, self.loaded.cross_layers, resume.cross.features)
            cache.write_cross(table, cross)
            p = image.prefix_len
            visible = image.row_visibility[p:, image.kept_image]  # (rows, kept): row sees the token's image
            sees = torch.arange(n, device=self.device) >= p  # the blind prefix sees no image
            blind = BlindPrefix(image, resume)
        rows = torch.arange(n, device=self.device)
        causal = rows[:, None] >= rows[None, :]
        cos, sin = self.text.rotary_emb(h, rows[None])
        masks = (visible, sees) if image is not None else ()
        on = {}  # device -> (cos, sin, causal, slots, *masks) there
        for idx in range(start, len(self.text.layers)):
            layer, dev = self.text.layers[idx], self.layer_devices[idx]
            h = h.to(dev)
            cos_d, sin_d, causal_d, slots_d, *masks_d = moved((cos, sin, causal, slots, *masks), dev, on)
            if idx in self.cross:
                if image is not None:  # a text-only prompt skips cross-attention layers, as HF does
                    visible_d, sees_d = masks_d
                    keys, values = cache.cross_kv(table, cache.kv_layer[idx])
                    q = cross_q(layer, h)
                    out = attend(q[:, :, p:], keys[None], values[None], layer.cross_attn.scaling,
                                 mask=visible_d[None, None])
                    if p:
                        out = torch.cat([blind.attend(layer, q[:, :, :p], keys, values), out], dim=2)
                    h = cross_finish(layer, h, out, sees_d[None])
                continue
            q, k, v = self_qkv(layer, h, cos_d, sin_d)
            kv_layer = cache.kv_layer[idx]
            view = cache.self_layer(kv_layer)
            view[slots_d, 0] = k[0].transpose(0, 1)
            view[slots_d, 1] = v[0].transpose(0, 1)
            keys, values = cache.self_kv(table, kv_layer, n)
            out = attend(q, keys[None], values[None], layer.self_attn.scaling, mask=causal_d)
            h = self_finish(layer, h, out)
        table.self_written = n
        return self._logits(h)[0]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for every sequence in one batched forward; returns logits (B, V)."""
        if self.graphs is not None and self.graphs.fits(seqs):
            return self.graphs.run(seqs)
        batch = decode_batch(seqs, self.device)
        logits = self.forward_decode(batch, self.attn.prepare(batch))
        for table, n in zip(batch.tables, batch.lengths):
            table.self_written = n
        return logits

    def forward_decode(self, batch: DecodeBatch, step) -> torch.Tensor:
        """The decode forward over a step's batch and its backend's prepared reads (`step`); no host read of a
        device tensor in here (a CUDA graph captures exactly this)."""
        h = self.text.embed_tokens(batch.tokens)[:, None]  # (B, 1, hidden)
        cos, sin = self.text.rotary_emb(h, batch.positions[:, None])
        on = {}  # device -> (cos, sin) there
        for idx, layer in enumerate(self.text.layers):
            kv_layer, dev = self.kv.kv_layer[idx], self.layer_devices[idx]
            h = h.to(dev)
            if idx in self.cross:
                if batch.cross is not None:
                    h = self._cross_decode(layer, h, batch, step, kv_layer)
                continue
            q, k, v = self_qkv(layer, h, *moved((cos, sin), dev, on))
            self.attn.write_self(kv_layer, k, v, batch)
            h = self_finish(layer, h, self.attn.self_attn(q, step, kv_layer, layer.self_attn.scaling))
        return self._logits(h)

    def _cross_decode(self, layer, h, batch: DecodeBatch, step, kv_layer: int) -> torch.Tensor:
        """Rows of text-only sequences pass through unchanged (HF skips the layer for them)."""
        cross = batch.cross
        x = h if cross.every_row else h[cross.rows.to(h.device)]
        q = cross_q(layer, x)
        out = self.attn.cross_attn(q, step, kv_layer, layer.cross_attn.scaling)
        sees = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        x = cross_finish(layer, x, out, sees)
        if cross.every_row:
            return x
        h = h.clone()
        h[cross.rows.to(h.device)] = x
        return h


class BlindPrefix:
    """The rows before the first image token in the later cross-attention layers: HF's all-zero mask row lets
    them attend, unmasked, to every visual token there, i.e. the kept tokens and the padding tiles' tokens (which
    trimming never drops), in the visual tokens' original order. The padding tokens' K/V are projected per layer
    from the shipped features and never enter the KV pages."""

    def __init__(self, image: ImageState, resume: ResumeState):
        self.features = resume.padding_features if resume.padding_features.numel() else None
        if self.features is not None:
            # the sorted union of kept and padding positions, as indices into cat([kept, padding])
            positions = resume.padding_positions.to(image.kept_image.device)
            self.order = torch.cat([image.kept_positions, positions]).argsort()

    def attend(self, layer, q, keys, values):
        """q (1, H, prefix, hd) over the kept tokens' keys, values (KVH, kept, hd) and this layer's padding K/V."""
        if self.features is not None:
            weight = layer.cross_attn.k_proj.weight
            pad_k, pad_v = cross_kv(layer, self.features.to(weight.device, weight.dtype))
            order = self.order.to(keys.device)
            keys = torch.cat([keys, pad_k.to(keys.dtype)], dim=1)[:, order]
            values = torch.cat([values, pad_v.to(values.dtype)], dim=1)[:, order]
        return attend(q, keys[None], values[None], layer.cross_attn.scaling)

"""Runs the text decoder over sequences whose K/V lives in the engine's arena: the prefill (resumed after the
first cross-attention layer from a TrimResult, or from layer 0 for a text-only prompt) and the batched
decode step, where projections and MLPs run on the whole batch and attention runs per sequence in place."""

import torch

from pipeline.engine.kv_cache import KVCache
from pipeline.engine.sequence import Sequence
from pipeline.model.layers import (
    attend,
    attend_one,
    cross_finish,
    cross_q,
    self_finish,
    self_qkv,
)
from pipeline.model.loaded import LoadedModel
from pipeline.model.trimmer import project_cross_kv


class ModelRunner:
    def __init__(self, loaded: LoadedModel, kv: KVCache):
        self.loaded = loaded
        self.kv = kv
        self.text = loaded.text
        self.lm_head = loaded.model.lm_head
        self.cross = set(loaded.cross_layers)
        self.first = loaded.first_cross
        self.device = loaded.device

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.text.norm(h[:, -1])).float()

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Fill the sequence's K/V for its prompt; return the logits of the next token (V,)."""
        n = seq.prompt_len
        kv, trim = seq.kv, seq.trim
        if trim is None:
            h, start, first_row = self.text.embed_tokens(torch.tensor(seq.prompt_token_ids, device=self.device))[None], 0, 0
        else:
            # Resume after the first cross-attention layer; the blind prefix rows arrive finished.
            h, start, first_row = trim.hidden[None].to(self.loaded.dtype), self.first + 1, trim.prefix_len
            kv.self_kv[: self.first, :, :, :n].copy_(trim.self_kv)
            later_self = [self.kv.slot[i] for i in range(start, len(self.text.layers)) if i not in self.cross]
            for j, slot in enumerate(later_self):
                kv.self_kv[slot, :, :, :first_row].copy_(trim.prefix_kv[j])
            if trim.cross_kv.numel():
                kv.cross_kv.copy_(trim.cross_kv)
            else:  # "features" mode: the trimmer shipped kept features; project every layer's K/V here
                kv.cross_kv.copy_(project_cross_kv(self.text, self.loaded.cross_layers, trim.kept_features))
            visible = trim.row_visibility[first_row:, trim.kept_image]  # (rows, kept): row sees the token's image
        rows = torch.arange(first_row, n, device=self.device)
        causal = rows[:, None] >= torch.arange(n, device=self.device)[None, :]
        cos, sin = self.text.rotary_emb(h, rows[None])
        for idx in range(start, len(self.text.layers)):
            layer = self.text.layers[idx]
            if idx in self.cross:
                if trim is not None:  # a text-only prompt skips cross-attention layers, as HF does
                    kvc = kv.cross_kv[self.kv.slot[idx]]
                    out = attend(cross_q(layer, h), kvc[0][None], kvc[1][None], layer.cross_attn.scaling,
                                 mask=visible[None, None])
                    h = cross_finish(layer, h, out, torch.ones(h.shape[:2], dtype=torch.bool, device=h.device))
                continue
            q, k, v = self_qkv(layer, h, cos, sin)
            store = kv.self_kv[self.kv.slot[idx]]
            store[0, :, first_row:n], store[1, :, first_row:n] = k[0], v[0]
            out = attend(q, store[0, :, :n][None], store[1, :, :n][None], layer.self_attn.scaling, mask=causal)
            h = self_finish(layer, h, out)
        return self._logits(h)[0]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for every sequence in one batched forward; returns logits (B, V)."""
        tokens = torch.tensor([s.last_token for s in seqs], device=self.device)
        pos = [s.num_tokens - 1 for s in seqs]  # position of the token being fed
        h = self.text.embed_tokens(tokens)[:, None]
        cos, sin = self.text.rotary_emb(h, torch.tensor(pos, device=self.device)[:, None])
        with_image = [i for i, s in enumerate(seqs) if s.trim is not None]
        for idx, layer in enumerate(self.text.layers):
            slot = self.kv.slot[idx]
            if idx in self.cross:
                if with_image:
                    h = self._cross_decode(layer, h, [seqs[i] for i in with_image], with_image, slot)
                continue
            q, k, v = self_qkv(layer, h, cos, sin)
            out = torch.empty_like(q)
            for i, s in enumerate(seqs):
                store = s.kv.self_kv[slot]
                store[0, :, pos[i]], store[1, :, pos[i]] = k[i, :, 0], v[i, :, 0]
                keys, values = store[0, :, : pos[i] + 1], store[1, :, : pos[i] + 1]
                out[i, :, 0] = attend_one(q[i, :, 0], keys, values, layer.self_attn.scaling)
            h = self_finish(layer, h, out)
        return self._logits(h)

    def _cross_decode(self, layer, h, seqs, rows, slot):
        """Rows of text-only sequences pass through unchanged (HF skips the layer for them)."""
        x = h[rows]
        q = cross_q(layer, x)
        out = torch.empty_like(q)
        for i, s in enumerate(seqs):
            kv = s.kv.cross_kv[slot]
            # A generated token sees what the prompt's last row sees (HF repeats that mask row).
            mask = s.trim.row_visibility[-1][s.trim.kept_image]
            mask = None if bool(mask.all()) else mask
            out[i, :, 0] = attend_one(q[i, :, 0], kv[0], kv[1], layer.cross_attn.scaling, mask=mask)
        h = h.clone()
        h[rows] = cross_finish(layer, x, out, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
        return h

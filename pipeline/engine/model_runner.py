"""Runs the text decoder over sequences whose K/V lives in the engine's KV pages: the batched, chunked prefill
(prefill.py) and the batched decode step, where projections and MLPs run on the whole batch and attention runs in
the device's backend."""

import torch

from pipeline.engine.attention import attention_backend
from pipeline.engine.kv_cache import KVCache
from pipeline.engine.prefill import Prefiller
from pipeline.engine.scheduler import PrefillChunk
from pipeline.engine.sequence import Sequence
from pipeline.model.layers import cross_finish, cross_q, self_finish, self_qkv
from pipeline.model.loaded import LoadedModel
from pipeline.model.placement import moved


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
        self.prefiller = Prefiller(loaded, kv)
        # Layers split over devices: each layer runs where its weights are (hidden state moved at the boundary).
        self.layer_devices = [loaded.devices[p] for p in loaded.placement]
        self.last = loaded.devices[-1]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """On the first device, where sampling's generator lives."""
        return self.lm_head(self.text.norm(h[:, -1].to(self.last))).float().to(self.device)

    def prefill(self, chunks: list[PrefillChunk]) -> tuple[list[Sequence], torch.Tensor]:
        """Several sequences' prompt chunks in one forward (prefill.py); (the sequences whose prompt ended, their
        next-token logits (k, V))."""
        return self.prefiller.run(chunks)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for every sequence in one batched forward; returns logits (B, V)."""
        tokens = torch.tensor([s.last_token for s in seqs], device=self.device)
        pos = [s.num_tokens - 1 for s in seqs]  # position of the token being fed
        tables = [s.pages for s in seqs]
        slots = torch.tensor([t.self_slot(p) for t, p in zip(tables, pos)], device=self.device)
        lengths = [p + 1 for p in pos]
        h = self.text.embed_tokens(tokens)[:, None]
        cos, sin = self.text.rotary_emb(h, torch.tensor(pos, device=self.device)[:, None])
        with_image = [i for i, s in enumerate(seqs) if s.image is not None]
        on = {}  # device -> (cos, sin) there
        for idx, layer in enumerate(self.text.layers):
            kv_layer, dev = self.kv.kv_layer[idx], self.layer_devices[idx]
            h = h.to(dev)
            if idx in self.cross:
                if with_image:
                    h = self._cross_decode(layer, h, [seqs[i] for i in with_image], with_image, kv_layer)
                continue
            q, k, v = self_qkv(layer, h, *moved((cos, sin), dev, on))
            self.attn.write_self(kv_layer, k, v, slots)
            h = self_finish(layer, h, self.attn.self_attn(q, tables, lengths, kv_layer, layer.self_attn.scaling))
        for table, n in zip(tables, lengths):
            table.self_written = n
        return self._logits(h)

    def _cross_decode(self, layer, h, seqs, rows, kv_layer):
        """Rows of text-only sequences pass through unchanged (HF skips the layer for them)."""
        x = h[rows]
        q = cross_q(layer, x)
        masks = []
        for s in seqs:
            # A generated token sees what the prompt's last row sees (HF repeats that mask row).
            mask = s.image.row_visibility[-1][s.image.kept_image]
            masks.append(None if bool(mask.all()) else mask.to(x.device))
        out = self.attn.cross_attn(q, [s.pages for s in seqs], masks, kv_layer, layer.cross_attn.scaling)
        h = h.clone()
        h[rows] = cross_finish(layer, x, out, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
        return h


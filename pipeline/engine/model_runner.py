"""Runs the text decoder over sequences whose K/V lives in the engine's KV pages: the batched, chunked prefill
(prefill.py) and the batched decode step, where projections and MLPs run on the whole batch and attention runs in
the device's backend."""

import torch

from pipeline.engine.attention import attention_backend
from pipeline.engine.cuda_graphs import DecodeGraphs
from pipeline.engine.kv_cache import KVCache
from pipeline.engine.prefill import Prefiller
from pipeline.engine.scheduler import PrefillChunk
from pipeline.engine.sequence import Sequence
from pipeline.engine.step_batch import DecodeBatch, decode_batch
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
        self.graphs: DecodeGraphs | None = None  # captured decode steps, when the engine turns CUDA graphs on
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


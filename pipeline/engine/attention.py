"""Decode-step attention over paged K/V, one backend per device. CPU: a loop over sequences, each reading its
K/V in place as a strided view when its pages are one run (the fastest measured on CPU). CUDA: torch's
`varlen_attn` over the page pool with a block table, one call per layer for the whole batch."""

import torch

from pipeline.engine.kv_cache import KVCache, SeqKV
from pipeline.model.layers import attend_one


class PerSequenceAttention:
    """q (B, H, 1, hd) -> out (B, H, 1, hd); the new K/V of the batch is written in one indexed copy a layer."""

    def __init__(self, kv: KVCache):
        self.kv = kv

    def write_self(self, slot: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        view = self.kv.self_layer(slot)  # on the layer's device, as k and v are
        slots = slots.to(view.device)
        view[slots, 0] = k[:, :, 0]
        view[slots, 1] = v[:, :, 0]

    def self_attn(self, q, kvs: list[SeqKV], lengths: list[int], slot: int, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        for i, (kv, n) in enumerate(zip(kvs, lengths)):
            keys, values = self.kv.self_kv(kv, slot, n)
            out[i, :, 0] = attend_one(q[i, :, 0], keys, values, scale)
        return out

    def cross_attn(self, q, kvs: list[SeqKV], masks: list, slot: int, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        for i, (kv, mask) in enumerate(zip(kvs, masks)):
            keys, values = self.kv.cross_kv(kv, slot)
            out[i, :, 0] = attend_one(q[i, :, 0], keys, values, scale, mask=mask)
        return out


class VarlenPagedAttention(PerSequenceAttention):
    """CUDA: flash attention's paged path; a sequence with a partial cross mask (several images, some rows
    blind to some) keeps the per-sequence path, which takes masks."""

    def __init__(self, kv: KVCache):
        super().__init__(kv)
        from torch.nn.attention.varlen import varlen_attn

        self.varlen_attn = varlen_attn

    def _pages(self, slot: int, size: int):
        """(pages, page_size, KVH, hd) K and V pools of one layer, strided views of its arena."""
        layer = self.kv.self_layer(slot).unflatten(0, (-1, size))  # (pages, size, 2, KVH, hd)
        return layer[:, :, 0], layer[:, :, 1]

    def _call(self, q, k_pool, v_pool, tables: list[list[int]], lengths: list[int], scale: float):
        dev = q.device
        b = q.shape[0]
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
        used = torch.tensor(lengths, dtype=torch.int32, device=dev)
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev)
        cu_k = torch.nn.functional.pad(used.cumsum(0, dtype=torch.int32), (1, 0))
        out = self.varlen_attn(q[:, :, 0], k_pool, v_pool, cu_q, cu_k, 1, max(lengths), scale=scale,
                               enable_gqa=True, seqused_k=used, block_table=table)  # (B, H, hd)
        return out[:, :, None]

    def self_attn(self, q, kvs, lengths, slot, scale):
        k_pool, v_pool = self._pages(slot, self.kv.block_size)
        return self._call(q, k_pool, v_pool, [kv.self_pages for kv in kvs], lengths, scale)

    def cross_attn(self, q, kvs, masks, slot, scale):
        plain = [i for i, m in enumerate(masks) if m is None]
        if len(plain) < len(kvs):
            out = super().cross_attn(q, kvs, masks, slot, scale)
        else:
            out = torch.empty_like(q)
        if plain:
            k_pool, v_pool = self.kv.cross_pool(slot)
            out[plain] = self._call(q[plain], k_pool, v_pool, [kvs[i].cross_pages for i in plain],
                                    [kvs[i].cross_tokens for i in plain], scale)
        return out


def attention_backend(kv: KVCache, device) -> PerSequenceAttention:
    return VarlenPagedAttention(kv) if torch.device(device).type == "cuda" else PerSequenceAttention(kv)

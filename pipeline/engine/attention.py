"""Decode-step attention over paged K/V, one backend per device. CPU: a loop over sequences, each reading its
K/V in place as a strided view when its pages are one run (the fastest measured on CPU). CUDA: torch's
`varlen_attn` over the page pool with a block table, one call per layer for the whole batch."""

import torch

from pipeline.engine.kv_cache import KVCache
from pipeline.engine.page_table import PageTable
from pipeline.model.layers import attend_one


class PerSequenceAttention:
    """q (B, H, 1, hd) -> out (B, H, 1, hd); the new K/V of the batch is written in one indexed copy a layer."""

    def __init__(self, kv: KVCache):
        self.kv = kv

    def write_self(self, kv_layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """The batch's new K/V (B, KVH, 1, hd) into one layer at the rows' token slots (B,)."""
        view = self.kv.self_layer(kv_layer)  # on the layer's device, as k and v are
        slots = slots.to(view.device)
        view[slots, 0] = k[:, :, 0]
        view[slots, 1] = v[:, :, 0]

    def self_attn(self, q, tables: list[PageTable], lengths: list[int], kv_layer: int, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        for i, (table, n) in enumerate(zip(tables, lengths)):
            keys, values = self.kv.self_kv(table, kv_layer, n)
            out[i, :, 0] = attend_one(q[i, :, 0], keys, values, scale)
        return out

    def cross_attn(self, q, tables: list[PageTable], masks: list, kv_layer: int, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        for i, (table, mask) in enumerate(zip(tables, masks)):
            keys, values = self.kv.cross_kv(table, kv_layer)
            out[i, :, 0] = attend_one(q[i, :, 0], keys, values, scale, mask=mask)
        return out


class VarlenPagedAttention(PerSequenceAttention):
    """CUDA: flash attention's paged path; a sequence with a partial cross mask (several images, some rows
    blind to some) keeps the per-sequence path, which takes masks."""

    def __init__(self, kv: KVCache):
        super().__init__(kv)
        from torch.nn.attention.varlen import varlen_attn

        self.varlen_attn = varlen_attn

    def _pages(self, kv_layer: int, size: int):
        """(pages, page_size, KVH, hd) K and V pools of one layer, strided views of its arena."""
        layer = self.kv.self_layer(kv_layer).unflatten(0, (-1, size))  # (pages, size, 2, KVH, hd)
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

    def self_attn(self, q, tables, lengths, kv_layer, scale):
        k_pool, v_pool = self._pages(kv_layer, self.kv.block_size)
        return self._call(q, k_pool, v_pool, [t.self_pages for t in tables], lengths, scale)

    def cross_attn(self, q, tables, masks, kv_layer, scale):
        plain = [i for i, m in enumerate(masks) if m is None]
        if len(plain) < len(tables):
            out = super().cross_attn(q, tables, masks, kv_layer, scale)
        else:
            out = torch.empty_like(q)
        if plain:
            k_pool, v_pool = self.kv.cross_pool(kv_layer)
            out[plain] = self._call(q[plain], k_pool, v_pool, [tables[i].cross_pages for i in plain],
                                    [tables[i].cross_tokens for i in plain], scale)
        return out


def attention_backend(kv: KVCache, device) -> PerSequenceAttention:
    return VarlenPagedAttention(kv) if torch.device(device).type == "cuda" else PerSequenceAttention(kv)

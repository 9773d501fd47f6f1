"""Decode-step attention over paged K/V, one backend per device, each reading the step's DecodeBatch (built once a
step) and preparing what it needs from it once (`prepare`), then one call a layer. CPU: the batch padded into one
gathered tensor a layer when the histories are short, each sequence in place when they are long (the rule below,
measured); CUDA: torch's `varlen_attn` over the page pools with the step's block tables."""

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from pipeline.engine.kv_cache import KVCache
from pipeline.engine.step_batch import DecodeBatch
from pipeline.model.layers import attend_chunks, attend_one

# CPU rule, measured with scripts/attention_rule.py (1 thread, fp32, one self layer, tiny 2x16 and bench 4x128
# KV heads x head dim, batch 1-128, history 16-1024; BENCHMARKS.md "Decode step"): the loop costs a fixed ~30-60 us
# a sequence plus its reads in place; the padded call one fixed cost plus a copy of every row it gathers. So the
# padded call wins when each sequence's gathered K (max_len x KVH x hd elements) is small, whatever the batch:
# padded / loop was 0.003-0.8 up to 32k elements (e.g. bench 64 x 64 tokens: 0.43, tiny 64 x 256: 0.19) and
# 1.0-7.7 from 64k on (bench 64 x 256: 2.2, tiny 128 x 1024: 2.1). Batch 1 is a draw below the bound.
PADDED_ELEMS = 32768
# Cross K/V never change once written, so the padded path keeps each cross layer's gathered K/V while the batch's
# rows with an image stay the same sequences in the same order (most steps); up to this many bytes, else it gathers
# every step. On this CPU the gather was most of a small model's step at batch 64 (pages spread over the arena).
GATHERED_CROSS_BYTES = 64 * 2**20


class PagedAttention:
    """What every backend shares: the new K/V written in one indexed copy a layer, and the in-place
    per-sequence loop (each sequence's K/V read as a view when its pages are one run)."""

    def __init__(self, kv: KVCache):
        self.kv = kv

    def write_self(self, kv_layer: int, k: torch.Tensor, v: torch.Tensor, batch: DecodeBatch) -> None:
        """The batch's new K/V (B, KVH, 1, hd) into one layer at the rows' token slots."""
        view = self.kv.self_layer(kv_layer)  # on the layer's device, as k and v are
        slots = batch.slots.to(view.device)
        view[slots, 0] = k[:, :, 0]
        view[slots, 1] = v[:, :, 0]

    def _loop_self(self, q, batch: DecodeBatch, kv_layer: int, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        for i, (table, n) in enumerate(zip(batch.tables, batch.lengths)):
            keys, values = self.kv.self_kv(table, kv_layer, n)
            out[i, :, 0] = attend_one(q[i, :, 0], keys, values, scale)
        return out

    def _loop_cross(self, q, batch: DecodeBatch, rows, kv_layer: int, scale: float) -> torch.Tensor:
        """q (R, H, 1, hd) of the rows with an image; `rows` of them are computed."""
        cross = batch.cross
        out = torch.empty_like(q)
        for r in rows:
            chunks = self.kv.cross_kv_chunks(cross.tables[r], kv_layer)
            mask = cross.mask[r, : cross.lengths[r]].to(q.device) if r in cross.partial else None
            out[r, :, 0] = attend_chunks(q[r, :, 0], chunks, scale, mask=mask)
        return out


@dataclass
class PaddedStep:
    """The CPU backend's per-step reads: for each attention kind, either None (per sequence this step) or the
    gather index into the arena (self: blocks of one slot's K/V of one row; cross: rows of head_dim elements)
    and the padding mask."""

    batch: DecodeBatch
    self_index: torch.Tensor | None  # (B, L): the (2, KVH, hd) blocks of self row 0; + row per row
    self_valid: torch.Tensor | None  # (B, 1, 1, L)
    cross_index: torch.Tensor | None  # (2, R, KVH, T): K and V of cross row 0
    cross_row: torch.Tensor | None  # (R, 1, T): + row * this per cross row
    cross_valid: torch.Tensor | None  # (R, 1, 1, T): visible and not padding
    gathered_cross: dict[int, torch.Tensor]  # kv_layer -> its (2, R, KVH, T, hd) K/V, kept across steps


class CpuAttention(PagedAttention):
    """CPU: per step, for self and for cross attention apart, one padded gather + two matmuls a layer for the
    whole batch when max_len x KVH x hd <= padded_elems, else the in-place per-sequence loop (padded_elems=0: always the
    loop; layers over several devices, i.e. several arenas, keep the loop too)."""

    def __init__(self, kv: KVCache, padded_elems: int = PADDED_ELEMS, gathered_cross_bytes: int = GATHERED_CROSS_BYTES):
        super().__init__(kv)
        self.padded_elems, self.gathered_cross_bytes = padded_elems, gathered_cross_bytes
        self._cross_rows_of: tuple[int, ...] = ()  # the allocations whose gathered cross K/V are kept
        self._gathered_cross: dict[int, torch.Tensor] = {}

    def prepare(self, batch: DecodeBatch) -> PaddedStep:
        """The step's gather indices, once (Python here is constant per layer: the layers only add an offset)."""
        kvh = self.kv.layout.kv_heads
        heads = torch.arange(kvh, device=batch.tokens.device)
        s_index = s_valid = c_index = c_row = c_valid = None
        single = len(self.kv.arenas) == 1
        if single and batch.max_len * kvh * self.kv.layout.head_dim <= self.padded_elems:
            arena, size = self.kv.arenas[0], self.kv.block_size
            pos = torch.arange(batch.max_len, device=heads.device)
            pages = batch.block_table.gather(1, (pos // size).clamp(max=batch.block_table.shape[1] - 1)
                                             .expand(batch.size, -1)).long()
            slots = pages * size + pos % size  # (B, L); padding reads a held slot, masked below
            # a slot's K and V of one self row are contiguous: gather whole (2, KVH, hd) blocks, one index each
            s_index = slots * arena.self_rows
            s_valid = (pos[None, :] < batch.context_lens[:, None])[:, None, None, :]
        cross = batch.cross
        if single and cross is not None and cross.max_kept * kvh * self.kv.layout.head_dim <= self.padded_elems:
            rows = pad_sequence([t.cross_rows[0] for t in cross.tables], batch_first=True)  # (R, T, 4)
            base, c_row, c_v, c_head = rows.unbind(-1)
            k_index = base[:, None, :] + c_head[:, None, :] * heads[None, :, None]
            c_index = torch.stack([k_index, k_index + c_v[:, None]])
            c_row = c_row[:, None]
            c_valid = cross.mask[:, None, None, :]
        rows_of = tuple(t.allocation for t in cross.tables) if c_index is not None else ()
        if rows_of != self._cross_rows_of:
            self._cross_rows_of, self._gathered_cross = rows_of, {}
        return PaddedStep(batch, s_index, s_valid, c_index, c_row, c_valid, self._gathered_cross)

    def self_attn(self, q, step: PaddedStep, kv_layer: int, scale: float) -> torch.Tensor:
        if step.self_index is None:
            return self._loop_self(q, step.batch, kv_layer, scale)
        _, row = self.kv.layout.where[False, kv_layer]
        layout = self.kv.layout
        blocks = self.kv.arenas[0].data.view(-1, 2 * layout.kv_heads * layout.head_dim)  # a slot's K/V of one row
        b, n = step.self_index.shape
        kv = blocks.index_select(0, (step.self_index + row).flatten()).view(b, n, 2, layout.kv_heads, -1)
        keys, values = kv.permute(2, 0, 3, 1, 4)  # (B, KVH, L, hd) each
        # K contiguous for its matmul (a strided one took 2.4x as long, measured); V reads fine strided
        return self._padded(q, (keys.contiguous(), values), step.self_valid, scale)

    def cross_attn(self, q, step: PaddedStep, kv_layer: int, scale: float) -> torch.Tensor:
        if step.cross_index is None:
            return self._loop_cross(q, step.batch, range(q.shape[0]), kv_layer, scale)
        kv = step.gathered_cross.get(kv_layer)
        if kv is None:
            _, row = self.kv.layout.where[True, kv_layer]
            kv = self._gather(step.cross_index + row * step.cross_row, q.shape[-1])
            if kv.nbytes * self.kv.num_cross <= self.gathered_cross_bytes:
                step.gathered_cross[kv_layer] = kv
        return self._padded(q, kv, step.cross_valid, scale)

    def _gather(self, index, hd: int) -> torch.Tensor:
        """The K and V rows at index (2, B, KVH, L), one index_select: (2, B, KVH, L, hd)."""
        rows = self.kv.arenas[0].data.view(-1, hd)  # the arena as rows of head_dim elements
        return rows.index_select(0, index.flatten()).view(*index.shape, hd)

    def _padded(self, q, kv, valid, scale: float) -> torch.Tensor:
        """q (B, H, 1, hd) over gathered K and V, (B, KVH, L, hd) each, valid (B, 1, 1, L)."""
        keys, values = kv
        b, kvh, _, hd = keys.shape
        qg = q.view(b, kvh, -1, hd)  # (B, KVH, groups, hd): each KV head's query group, no K/V repeat
        scores = (qg @ keys.transpose(-1, -2)) * scale  # (B, KVH, groups, L)
        scores = scores.masked_fill(~valid, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        return (probs @ values).view(q.shape)


@dataclass
class VarlenStep:
    """The CUDA backend's per-step reads: the kernel's query and key offsets."""

    batch: DecodeBatch
    cu_q: torch.Tensor  # (B + 1,) int32: one query a sequence
    cu_k: torch.Tensor  # (B + 1,) int32
    plain: torch.Tensor | None  # (P,) rows with an image that see all their kept tokens (None: every one)
    cross_cu_q: torch.Tensor | None  # (P + 1,) int32
    cross_cu_k: torch.Tensor | None
    max_k: int  # bound of the self lengths (a CUDA graph fixes it at capture)


class VarlenPagedAttention(PagedAttention):
    """CUDA: flash attention's paged path, one call a layer for the batch; a row with a partial cross mask (several
    images, the row blind to some) keeps the per-sequence path for cross-attention, which takes masks. `kernel`
    is varlen_attn, or a reference with its contract (pipeline/engine/varlen_ref.py) on CPU in tests."""

    def __init__(self, kv: KVCache, kernel=None):
        super().__init__(kv)
        if kernel is None:
            from torch.nn.attention.varlen import varlen_attn as kernel
        self.kernel = kernel

    def prepare(self, batch: DecodeBatch, max_k: int | None = None) -> VarlenStep:
        dev = batch.tokens.device
        cu_q = torch.arange(batch.size + 1, dtype=torch.int32, device=dev)
        cu_k = torch.nn.functional.pad(batch.context_lens.cumsum(0, dtype=torch.int32), (1, 0))
        plain = c_cu_q = c_cu_k = None
        cross = batch.cross
        if cross is not None:
            lens = cross.cross_lens
            if cross.partial:
                plain = torch.tensor([r for r in range(len(cross.lengths)) if r not in cross.partial],
                                     dtype=torch.long, device=dev)
                lens = lens[plain]
            c_cu_q = torch.arange(lens.shape[0] + 1, dtype=torch.int32, device=dev)
            c_cu_k = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
        return VarlenStep(batch, cu_q, cu_k, plain, c_cu_q, c_cu_k, max_k or batch.max_len)

    def _pages(self, kv_layer: int):
        """(pages, page_size, KVH, hd) K and V pools of one self layer, strided views of its arena."""
        layer = self.kv.self_layer(kv_layer).unflatten(0, (-1, self.kv.block_size))  # (pages, size, 2, KVH, hd)
        return layer[:, :, 0], layer[:, :, 1]

    def self_attn(self, q, step: VarlenStep, kv_layer: int, scale: float) -> torch.Tensor:
        b = step.batch
        k_pool, v_pool = self._pages(kv_layer)
        dev = k_pool.device
        out = self.kernel(q[:, :, 0], k_pool, v_pool, step.cu_q.to(dev), step.cu_k.to(dev), 1, step.max_k,
                          scale=scale, enable_gqa=True, seqused_k=b.context_lens.to(dev),
                          block_table=b.block_table.to(dev))  # (B, H, hd)
        return out[:, :, None]

    def cross_attn(self, q, step: VarlenStep, kv_layer: int, scale: float) -> torch.Tensor:
        cross = step.batch.cross
        k_pool, v_pool = self.kv.cross_pool(kv_layer)
        dev = k_pool.device
        if not cross.partial:
            out = self.kernel(q[:, :, 0], k_pool, v_pool, step.cross_cu_q.to(dev), step.cross_cu_k.to(dev), 1,
                              cross.max_kept, scale=scale, enable_gqa=True, seqused_k=cross.cross_lens.to(dev),
                              block_table=cross.block_table.to(dev))
            return out[:, :, None]
        out = self._loop_cross(q, step.batch, cross.partial, kv_layer, scale)
        if step.plain.numel():
            plain = step.plain.to(dev)
            out[plain] = self.kernel(q[plain, :, 0], k_pool, v_pool, step.cross_cu_q.to(dev),
                                     step.cross_cu_k.to(dev), 1, cross.max_kept, scale=scale, enable_gqa=True,
                                     seqused_k=cross.cross_lens.to(dev)[plain],
                                     block_table=cross.block_table.to(dev)[plain])[:, :, None]
        return out


def attention_backend(kv: KVCache, device) -> PagedAttention:
    return VarlenPagedAttention(kv) if torch.device(device).type == "cuda" else CpuAttention(kv)

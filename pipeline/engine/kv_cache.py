"""Paged KV memory: one preallocated arena sized by the byte budget, cut into equal pages. A self-attention page
holds `block_size` text tokens for the self-attention layers only; a cross-attention page holds (n_self / n_cross)
x as many visual tokens for the cross-attention layers only, so a visual token costs nothing in the self layers.

Inside a page the token is the outer dimension, so pages p..p+m form one flat token axis: a sequence whose pages
are one run is read as a strided view, (KVH, T, hd), with no copy; a fragmented one is gathered."""

from dataclasses import dataclass, field
from math import gcd

import torch

from pipeline.engine.block_manager import BlockManager, runs


@dataclass
class SeqKV:
    self_pages: list[int] = field(default_factory=list)
    cross_pages: list[int] = field(default_factory=list)
    cross_tokens: int = 0
    self_written: int = 0  # self-attention positions holding K/V (bytes written, for utilisation)
    self_base: int | None = None  # flat slot of position 0 when the self pages are one run
    cross_base: int | None = None
    self_index: torch.Tensor | None = None  # flat slots of every held position, for a gather when fragmented
    cross_index: torch.Tensor | None = None


class KVCache:
    def __init__(self, budget_bytes: int, num_layers: int, cross_layers: list[int], kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, block_size: int = 16):
        self.num_self, self.num_cross = num_layers - len(cross_layers), len(cross_layers)
        self.slot = {}  # layer index -> its position among the self or the cross layers
        for kind in (False, True):
            idx = [i for i in range(num_layers) if (i in cross_layers) == kind]
            self.slot.update({layer: n for n, layer in enumerate(idx)})
        self.kv_heads, self.head_dim, self.itemsize, self.device = kv_heads, head_dim, dtype.itemsize, device
        ns, nc = max(self.num_self, 1), max(self.num_cross, 1)
        step = nc // gcd(ns, nc)  # the page holds a whole number of cross tokens
        self.block_size = -(-block_size // step) * step  # self tokens a page
        self.cross_block_size = self.block_size * ns // nc  # cross tokens a page
        self.token_elems = 2 * kv_heads * head_dim  # one token's K and V in one layer
        page_elems = self.block_size * ns * self.token_elems
        self.blocks = BlockManager(budget_bytes // (page_elems * self.itemsize), page_elems * self.itemsize)
        arena = torch.zeros(self.blocks.num_pages * page_elems, dtype=dtype, device=device)
        # (slots, layers, K/V, KVH, hd): slot s of page p is p * block_size + s
        self.self_view = arena.view(-1, ns, 2, kv_heads, head_dim)
        self.cross_view = arena.view(-1, nc, 2, kv_heads, head_dim)

    # --- bytes ------------------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self.blocks.used_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.blocks.capacity_bytes

    def pages_needed(self, self_tokens: int, cross_tokens: int) -> int:
        return -(-self_tokens // self.block_size) + -(-cross_tokens // self.cross_block_size)

    def bytes_needed(self, self_tokens: int, cross_tokens: int) -> int:
        return self.pages_needed(self_tokens, cross_tokens) * self.blocks.page_bytes

    def written_bytes(self, kv: SeqKV) -> int:
        """Bytes of K/V actually written for a sequence (held pages minus their unwritten tail)."""
        return (kv.self_written * self.num_self + kv.cross_tokens * self.num_cross) * self.token_elems * self.itemsize

    # --- pages of one sequence ---------------------------------------------------------------------------
    def allocate(self, self_tokens: int, cross_tokens: int, watermark: int = 0) -> SeqKV | None:
        """Pages for the first `self_tokens` positions and every kept visual token; None if they do not fit."""
        n_self = -(-self_tokens // self.block_size)
        n_cross = -(-cross_tokens // self.cross_block_size)
        if not self.blocks.can_allocate(n_self + n_cross, watermark):
            return None
        kv = SeqKV(cross_pages=self.blocks.allocate(n_cross), cross_tokens=cross_tokens)
        kv.self_pages = self.blocks.allocate(n_self)
        self._index(kv)
        return kv

    def grow(self, kv: SeqKV, self_tokens: int) -> bool:
        """Room for `self_tokens` positions: one more page when the last is full; False if none is free."""
        need = -(-self_tokens // self.block_size) - len(kv.self_pages)
        if need <= 0:
            return True
        if not self.blocks.can_allocate(need):
            return False
        kv.self_pages += self.blocks.allocate(need, after=kv.self_pages[-1] if kv.self_pages else None)
        self._index(kv, cross=False)
        return True

    def release(self, kv: SeqKV) -> None:
        self.blocks.free(kv.self_pages)
        self.blocks.free(kv.cross_pages)
        kv.self_pages, kv.cross_pages = [], []

    def _index(self, kv: SeqKV, cross: bool = True) -> None:
        kv.self_base, kv.self_index = self._layout(kv.self_pages, self.block_size)
        if cross:
            kv.cross_base, kv.cross_index = self._layout(kv.cross_pages, self.cross_block_size)

    def _layout(self, pages: list[int], size: int) -> tuple[int | None, torch.Tensor | None]:
        if runs(pages) <= 1:
            return (pages[0] * size if pages else 0), None
        p = torch.tensor(pages, device=self.device)
        return None, (p[:, None] * size + torch.arange(size, device=self.device)).flatten()

    # --- slots and reads ---------------------------------------------------------------------------------
    def self_slots(self, kv: SeqKV, start: int, end: int) -> torch.Tensor:
        if kv.self_base is not None:
            return torch.arange(kv.self_base + start, kv.self_base + end, device=self.device)
        return kv.self_index[start:end]

    def self_slot(self, kv: SeqKV, pos: int) -> int:
        if kv.self_base is not None:
            return kv.self_base + pos
        return kv.self_pages[pos // self.block_size] * self.block_size + pos % self.block_size

    def cross_slots(self, kv: SeqKV) -> torch.Tensor:
        if kv.cross_base is not None:
            return torch.arange(kv.cross_base, kv.cross_base + kv.cross_tokens, device=self.device)
        return kv.cross_index[: kv.cross_tokens]

    def self_kv(self, kv: SeqKV, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [0, n) of one self-attention layer slot: (KVH, n, hd) each, a view when possible."""
        if kv.self_base is not None:
            x = self.self_view[kv.self_base : kv.self_base + n, slot]
        else:
            x = self.self_view[:, slot].index_select(0, kv.self_index[:n])
        return x[:, 0].transpose(0, 1), x[:, 1].transpose(0, 1)

    def cross_kv(self, kv: SeqKV, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = kv.cross_tokens
        if kv.cross_base is not None:
            x = self.cross_view[kv.cross_base : kv.cross_base + n, slot]
        else:
            x = self.cross_view[:, slot].index_select(0, kv.cross_index[:n])
        return x[:, 0].transpose(0, 1), x[:, 1].transpose(0, 1)

    # --- preemption: a sequence's K/V to host memory and back ---------------------------------------------
    def swap_out(self, kv: SeqKV) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy what the sequence wrote to host memory and free its pages."""
        saved = (self.self_view[self.self_slots(kv, 0, kv.self_written)].to("cpu", copy=True),
                 self.cross_view[self.cross_slots(kv)].to("cpu", copy=True))
        self.release(kv)
        return saved

    def swap_in(self, kv: SeqKV, saved, self_tokens: int, watermark: int = 0) -> bool:
        """Pages for `self_tokens` positions and the cross tokens, filled from `saved`; False if they do not fit."""
        fresh = self.allocate(self_tokens, kv.cross_tokens, watermark)
        if fresh is None:
            return False
        fresh.self_written = kv.self_written
        kv.__dict__.update(fresh.__dict__)
        self.self_view[self.self_slots(kv, 0, kv.self_written)] = saved[0].to(self.device)
        self.cross_view[self.cross_slots(kv)] = saved[1].to(self.device)
        return True

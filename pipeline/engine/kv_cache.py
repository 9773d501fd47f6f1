"""Paged KV memory: one preallocated arena sized by the byte budget, cut into equal pages. A self-attention page
holds `block_size` text tokens for the self-attention layers only; a cross-attention page holds (n_self / n_cross)
x as many visual tokens for the cross-attention layers only, so a visual token costs nothing in the self layers.

Self pages: the token is the outer dimension, so pages p..p+m form one flat token axis and a sequence whose pages
are one run is read as a strided view, (KVH, T, hd), with no copy (a fragmented one is gathered). Cross pages are
written once, at admission, so each contiguous run of them is laid out as a whole, (layers, 2, KVH, T, hd): read
as contiguous K/V like a dense cache ("run" layout, CPU); "page" layout (CUDA) lays out every page alone as
(layers, 2, tokens, KVH, hd), the page pool a block table indexes.

Layers placed over several devices: one arena per device holds the layers placed there, page p at the same index in
every arena (one page id, one BlockManager). An arena's page holds P tokens x layers, P a common multiple of the self
and cross page sizes covering its layers; with the layers' self/cross ratio in every arena (e.g. the 90B over 4 GPUs)
that is exactly its share, otherwise a few rows pad it."""

from dataclasses import dataclass, field
from math import gcd, lcm

import torch

from pipeline.engine.block_manager import BlockManager, runs


@dataclass
class SeqKV:
    self_pages: list[int] = field(default_factory=list)
    cross_pages: list[int] = field(default_factory=list)
    cross_tokens: int = 0
    self_written: int = 0  # self-attention positions holding K/V (bytes written, for utilisation)
    self_base: int | None = None  # flat slot of position 0 when the self pages are one run
    self_index: torch.Tensor | None = None  # flat slots of every held position, for a gather when fragmented
    cross_dense: list[torch.Tensor] | None = None  # per arena (rows, 2, KVH, kept, hd) when the pages are one chunk


@dataclass
class Arena:
    """One device's pages: `self_rows` self-layer rows of block_size tokens or `cross_rows` cross-layer rows of
    cross_block_size tokens a page (the layers placed here, plus padding rows)."""

    data: torch.Tensor  # (pages * page_elems,)
    self_rows: int
    cross_rows: int
    page_elems: int
    cross_slots: list[int]  # the cross slots it holds, row by row
    self_view: torch.Tensor  # (slots, self_rows, 2, KVH, hd): slot s of page p is p * block_size + s


class KVCache:
    def __init__(self, budget_bytes: int, num_layers: int, cross_layers: list[int], kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, block_size: int = 16, cross_layout: str = "run",
                 placement: list[int] | None = None, devices: list | None = None):
        """placement[i]: the index in `devices` of layer i's device (None: every layer on `device`)."""
        self.num_self, self.num_cross = num_layers - len(cross_layers), len(cross_layers)
        self.slot = {}  # layer index -> its position among the self or the cross layers
        for kind in (False, True):
            idx = [i for i in range(num_layers) if (i in cross_layers) == kind]
            self.slot.update({layer: n for n, layer in enumerate(idx)})
        self.kv_heads, self.head_dim, self.itemsize = kv_heads, head_dim, dtype.itemsize
        devices = [torch.device(d) for d in (devices or [device])]
        placement = placement or [0] * num_layers
        self.device = devices[0]
        ns, nc = max(self.num_self, 1), max(self.num_cross, 1)
        step = nc // gcd(ns, nc)  # the page holds a whole number of cross tokens
        self.block_size = -(-block_size // step) * step  # self tokens a page
        self.cross_block_size = self.block_size * ns // nc  # cross tokens a page
        self.token_elems = 2 * kv_heads * head_dim  # one token's K and V in one layer
        # Per arena: token-rows P a page, a multiple of both page sizes covering its self and its cross layers.
        unit, shape, self.where = lcm(self.block_size, self.cross_block_size), [], {}
        for a in range(len(devices)):
            mine = [i for i in range(num_layers) if placement[i] == a]
            self_slots = [self.slot[i] for i in mine if i not in cross_layers]
            cross_slots = [self.slot[i] for i in mine if i in cross_layers]
            self.where.update({(False, s): (a, row) for row, s in enumerate(self_slots)})
            self.where.update({(True, s): (a, row) for row, s in enumerate(cross_slots)})
            rows = max(self.block_size * len(self_slots), self.cross_block_size * len(cross_slots))
            shape.append((-(-rows // unit) * unit, cross_slots))
        page_bytes = sum(p for p, _ in shape) * self.token_elems * self.itemsize
        self.blocks = BlockManager(budget_bytes // page_bytes, page_bytes)
        self.arenas = []
        for d, (p, cross_slots) in zip(devices, shape):
            data = torch.zeros(self.blocks.num_pages * p * self.token_elems, dtype=dtype, device=d)
            self.arenas.append(Arena(data, p // self.block_size, p // self.cross_block_size, p * self.token_elems,
                                     cross_slots, data.view(-1, p // self.block_size, 2, kv_heads, head_dim)))
        self.cross_layout = cross_layout

    @property
    def arena(self) -> torch.Tensor:
        """The first device's arena (the only one without a placement)."""
        return self.arenas[0].data

    def self_layer(self, slot: int) -> torch.Tensor:
        """One self-attention layer's K/V over every slot, (slots, 2, KVH, hd), on the layer's device."""
        a, row = self.where[False, slot]
        return self.arenas[a].self_view[:, row]

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
        chunks = [self._cross_chunks(kv, arena) for arena in self.arenas]
        kv.cross_dense = [c[0] for c in chunks] if all(len(c) == 1 for c in chunks) else None
        return kv

    def grow(self, kv: SeqKV, self_tokens: int) -> bool:
        """Room to write position self_tokens - 1: one more page when the last is full, or a private copy of the
        last page when it is shared (copy on write); False if no page is free."""
        need = -(-self_tokens // self.block_size) - len(kv.self_pages)
        last = (self_tokens - 1) // self.block_size
        if need <= 0 and self.blocks.refs[kv.self_pages[last]] == 1:
            return True
        if not self.blocks.can_allocate(max(need, 1)):
            return False
        if need > 0:
            kv.self_pages += self.blocks.allocate(need, after=kv.self_pages[-1] if kv.self_pages else None)
        else:
            shared = kv.self_pages[last]
            (page,) = self.blocks.allocate(1, after=kv.self_pages[last - 1] if last else None)
            size = self.block_size
            for arena in self.arenas:
                view = arena.self_view
                view[page * size : (page + 1) * size] = view[shared * size : (shared + 1) * size]
            self.blocks.free([shared])
            kv.self_pages[last] = page
        self._index(kv)
        return True

    def fork(self, kv: SeqKV) -> SeqKV:
        """A second holder of every page (n > 1): the image's and the prompt's K/V are stored once."""
        self.blocks.share(kv.self_pages)
        self.blocks.share(kv.cross_pages)
        return SeqKV(list(kv.self_pages), list(kv.cross_pages), kv.cross_tokens, kv.self_written, kv.self_base,
                     kv.self_index, kv.cross_dense)

    def release(self, kv: SeqKV) -> None:
        self.blocks.free(kv.self_pages)
        self.blocks.free(kv.cross_pages)
        kv.self_pages, kv.cross_pages, kv.cross_dense = [], [], None

    def _index(self, kv: SeqKV) -> None:
        pages, size = kv.self_pages, self.block_size
        if runs(pages) <= 1:
            kv.self_base, kv.self_index = (pages[0] * size if pages else 0), None
        else:
            p = torch.tensor(pages, device=self.device)
            kv.self_base, kv.self_index = None, (p[:, None] * size + torch.arange(size, device=self.device)).flatten()

    # --- slots and reads ---------------------------------------------------------------------------------
    def self_slots(self, kv: SeqKV, start: int, end: int) -> torch.Tensor:
        if kv.self_base is not None:
            return torch.arange(kv.self_base + start, kv.self_base + end, device=self.device)
        return kv.self_index[start:end]

    def self_slot(self, kv: SeqKV, pos: int) -> int:
        if kv.self_base is not None:
            return kv.self_base + pos
        return kv.self_pages[pos // self.block_size] * self.block_size + pos % self.block_size

    def self_kv(self, kv: SeqKV, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [0, n) of one self-attention layer slot: (KVH, n, hd) each, a view when possible."""
        layer = self.self_layer(slot)
        if kv.self_base is not None:
            x = layer[kv.self_base : kv.self_base + n]
        else:
            x = layer.index_select(0, kv.self_index[:n].to(layer.device))
        return x[:, 0].transpose(0, 1), x[:, 1].transpose(0, 1)

    # --- cross pages: written once, read in runs ------------------------------------------------------------
    def _cross_chunks(self, kv: SeqKV, arena: Arena) -> list[torch.Tensor]:
        """Views (rows, 2, KVH, tokens, hd) of the sequence's cross pages in one arena, in token order, with the
        tokens each holds: one per contiguous run ("run" layout) or per page ("page" layout)."""
        pages, chunks, left = kv.cross_pages, [], kv.cross_tokens
        i = 0
        while i < len(pages) and left > 0:
            j = i + 1
            while self.cross_layout == "run" and j < len(pages) and pages[j] == pages[j - 1] + 1:
                j += 1
            region = arena.data[pages[i] * arena.page_elems : (pages[i] + j - i) * arena.page_elems]
            size = (j - i) * self.cross_block_size
            if self.cross_layout == "run":
                view = region.view(arena.cross_rows, 2, self.kv_heads, size, self.head_dim)
            else:
                view = region.view(arena.cross_rows, 2, size, self.kv_heads, self.head_dim).transpose(2, 3)
            chunks.append(view[:, :, :, : min(size, left)])
            left -= size
            i = j
        return chunks

    def write_cross(self, kv: SeqKV, cross: torch.Tensor) -> None:
        """cross: (cross layers, 2, KVH, kept, hd); each arena takes its layers' rows."""
        for arena in self.arenas:
            rows, start = len(arena.cross_slots), 0
            for chunk in self._cross_chunks(kv, arena):
                chunk[:rows].copy_(cross[arena.cross_slots, :, :, start : start + chunk.shape[3]])
                start += chunk.shape[3]

    def _read_arena(self, kv: SeqKV, a: int) -> torch.Tensor:
        """(rows, 2, KVH, kept, hd) of one arena: a view when the pages are one run, else a copy."""
        if kv.cross_dense is not None:
            return kv.cross_dense[a]
        arena = self.arenas[a]
        chunks = self._cross_chunks(kv, arena)
        if len(chunks) == 1:
            return chunks[0]
        if not chunks:
            return torch.empty(arena.cross_rows, 2, self.kv_heads, 0, self.head_dim, dtype=arena.data.dtype,
                               device=arena.data.device)
        return torch.cat(chunks, dim=3)

    def read_cross(self, kv: SeqKV, device=None) -> torch.Tensor:
        """(cross layers, 2, KVH, kept, hd) on `device` (default: the first device)."""
        parts = [self._read_arena(kv, a) for a in range(len(self.arenas))]
        if len(parts) == 1:
            return parts[0][: self.num_cross].to(device or self.device)
        device = device or self.device
        return torch.stack([parts[a][row].to(device) for a, row in (self.where[True, s]
                                                                    for s in range(self.num_cross))])

    def cross_kv(self, kv: SeqKV, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one cross-attention layer slot: (KVH, kept, hd) each, on the layer's device."""
        a, row = self.where[True, slot]
        x = self._read_arena(kv, a)[row]
        return x[0], x[1]

    def cross_pool(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """"page" layout: K and V page pools of one cross layer, (pages, tokens, KVH, hd), for a block table."""
        a, row = self.where[True, slot]
        arena = self.arenas[a]
        pages = arena.data.view(-1, arena.cross_rows, 2, self.cross_block_size, self.kv_heads, self.head_dim)
        return pages[:, row, 0], pages[:, row, 1]

    # --- preemption: a sequence's K/V to host memory and back ---------------------------------------------
    def swap_out(self, kv: SeqKV) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy what the sequence wrote to host memory and free its pages."""
        slots = self.self_slots(kv, 0, kv.self_written)
        saved = ([a.self_view[slots.to(a.data.device)].to("cpu", copy=True) for a in self.arenas],
                 [self._read_arena(kv, i).to("cpu", copy=True) for i in range(len(self.arenas))])
        self.release(kv)
        return saved

    def swap_in(self, kv: SeqKV, saved, self_tokens: int, watermark: int = 0) -> bool:
        """Pages for `self_tokens` positions and the cross tokens, filled from `saved`; False if they do not fit."""
        fresh = self.allocate(self_tokens, kv.cross_tokens, watermark)
        if fresh is None:
            return False
        fresh.self_written = kv.self_written
        kv.__dict__.update(fresh.__dict__)
        slots = self.self_slots(kv, 0, kv.self_written)
        for i, arena in enumerate(self.arenas):
            arena.self_view[slots.to(arena.data.device)] = saved[0][i].to(arena.data.device)
            chunks = self._cross_chunks(kv, arena)
            for chunk, part in zip(chunks, saved[1][i].split([c.shape[3] for c in chunks], dim=3)):
                chunk.copy_(part)
        return True

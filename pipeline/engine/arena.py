"""The KV arenas' layout: one preallocated tensor per device cut into equal pages, which arena and row holds each
layer's K/V, and the views a page table gives. A layer is addressed by its kv_layer: its ordinal among the self or
among the cross-attention layers (token positions are slots, see page_table.py).

A self-attention page holds `block_size` text tokens for the self-attention layers only; a cross-attention page
holds (n_self / n_cross) x as many visual tokens for the cross-attention layers only, so a visual token costs
nothing in the self layers. Self pages: the token is the outer dimension, so pages p..p+m form one flat token axis
and a run of pages is read as a strided view, (KVH, T, hd), with no copy (a fragmented one is gathered). Cross pages
are written once, at admission, so each contiguous run of them is laid out as a whole, (layers, 2, KVH, T, hd):
read as contiguous K/V like a dense cache ("run" layout, CPU); "page" layout (CUDA) lays out every page alone as
(layers, 2, tokens, KVH, hd), the page pool a block table indexes.

Layers placed over several devices: one arena per device holds the layers placed there, page p at the same index in
every arena (one page id, one BlockManager). An arena's page holds P tokens x layers, P a common multiple of the self
and cross page sizes covering its layers; with the layers' self/cross ratio in every arena (e.g. the 90B over 4 GPUs)
that is exactly its share, otherwise a few rows pad it."""

from dataclasses import dataclass
from math import gcd, lcm

import torch

from pipeline.engine.page_table import PageTable

CROSS_LAYOUTS = ("run", "page")


@dataclass
class Arena:
    """One device's pages: `self_rows` self-layer rows of block_size tokens or `cross_rows` cross-layer rows of
    cross_block_size tokens a page (the layers placed here, plus padding rows)."""

    data: torch.Tensor  # (pages * page_elems,)
    self_rows: int
    cross_rows: int
    page_elems: int
    cross_layers: list[int]  # the cross kv_layers it holds, row by row
    self_view: torch.Tensor  # (slots, self_rows, 2, KVH, hd)


# Flash attention 2's paged path (what varlen_attn calls with a block table) takes pages of a multiple of 256
# tokens; on CUDA the self page is rounded up to it (the cross page is n_self / n_cross times as large).
CUDA_PAGE = 256


def page_layout(block_size: int, device) -> tuple[int, str]:
    """The configured page size and cross layout for a device: CUDA's "page" layout rounds to CUDA_PAGE."""
    if torch.device(device).type == "cuda":
        return -(-block_size // CUDA_PAGE) * CUDA_PAGE, "page"
    return block_size, "run"


def whole_cross_tokens(block_size: int, num_layers: int, cross_layers: list[int]) -> int:
    """block_size rounded up so that a page holds a whole number of cross tokens (n_self / n_cross as many)."""
    ns, nc = max(num_layers - len(cross_layers), 1), max(len(cross_layers), 1)
    step = nc // gcd(ns, nc)
    return -(-block_size // step) * step


def self_page_tokens(block_size: int, num_layers: int, cross_layers: list[int], device) -> int:
    """Self-attention tokens an engine's page holds for a configured block_size on a device. The prefix caches
    page by it, so the trimmer's cached rows end where the decoder's do."""
    return whole_cross_tokens(page_layout(block_size, device)[0], num_layers, cross_layers)


class ArenaLayout:
    def __init__(self, budget_bytes: int, num_layers: int, cross_layers: list[int], kv_heads: int, head_dim: int,
                 dtype: torch.dtype, devices: list, block_size: int, cross_layout: str, placement: list[int]):
        """placement[i]: the index in `devices` of layer i's device."""
        assert cross_layout in CROSS_LAYOUTS, cross_layout
        self.cross_layout = cross_layout
        self.num_self, self.num_cross = num_layers - len(cross_layers), len(cross_layers)
        self.kv_layer = {}  # layer index -> its position among the self or the cross layers
        for kind in (False, True):
            idx = [i for i in range(num_layers) if (i in cross_layers) == kind]
            self.kv_layer.update({layer: n for n, layer in enumerate(idx)})
        self.kv_heads, self.head_dim, self.itemsize = kv_heads, head_dim, dtype.itemsize
        ns, nc = max(self.num_self, 1), max(self.num_cross, 1)
        self.block_size = whole_cross_tokens(block_size, num_layers, cross_layers)  # self tokens a page
        self.cross_block_size = self.block_size * ns // nc  # cross tokens a page
        self.token_elems = 2 * kv_heads * head_dim  # one token's K and V in one layer
        # Per arena: token-rows P a page, a multiple of both page sizes covering its self and its cross layers.
        unit, shape = lcm(self.block_size, self.cross_block_size), []
        self.where = {}  # (is cross, kv_layer) -> (arena, row)
        for a in range(len(devices)):
            mine = [i for i in range(num_layers) if placement[i] == a]
            self_layers = [self.kv_layer[i] for i in mine if i not in cross_layers]
            cross_here = [self.kv_layer[i] for i in mine if i in cross_layers]
            self.where.update({(False, s): (a, row) for row, s in enumerate(self_layers)})
            self.where.update({(True, s): (a, row) for row, s in enumerate(cross_here)})
            rows = max(self.block_size * len(self_layers), self.cross_block_size * len(cross_here))
            shape.append((-(-rows // unit) * unit, cross_here))
        self.page_bytes = sum(p for p, _ in shape) * self.token_elems * self.itemsize
        self.num_pages = budget_bytes // self.page_bytes
        self.arenas = []
        for d, (p, cross_here) in zip(devices, shape):
            data = torch.zeros(self.num_pages * p * self.token_elems, dtype=dtype, device=d)
            self.arenas.append(Arena(data, p // self.block_size, p // self.cross_block_size, p * self.token_elems,
                                     cross_here, data.view(-1, p // self.block_size, 2, kv_heads, head_dim)))

    def self_layer(self, kv_layer: int) -> torch.Tensor:
        """One self-attention layer's K/V over every slot, (slots, 2, KVH, hd), on the layer's device."""
        a, row = self.where[False, kv_layer]
        return self.arenas[a].self_view[:, row]

    def cross_chunks(self, table: PageTable, arena: Arena) -> list[torch.Tensor]:
        """Views (rows, 2, KVH, tokens, hd) of a sequence's cross pages in one arena, in token order, with the
        tokens each holds: one per contiguous run ("run" layout) or per page ("page" layout)."""
        pages, chunks, left = table.cross_pages, [], table.cross_tokens
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

    def cross_rows(self, table: PageTable) -> list[torch.Tensor]:
        """Per arena, where each kept token's K/V rows are, in units of head_dim elements of the arena's data:
        (kept, 4) int64 = (token's row-0 K of head 0, +per cross row, +V, +per head). A batched read gathers any
        sequence's cross K/V of any row with one index_select, whatever its layout and fragmentation."""
        out, hd = [], self.head_dim
        for arena in self.arenas:
            parts = []
            for chunk in self.cross_chunks(table, arena):  # (rows, 2, KVH, tokens, hd)
                s_row, s_kv, s_head, s_tok, _ = chunk.stride()
                t = torch.arange(chunk.shape[3])
                parts.append(torch.stack([chunk.storage_offset() + t * s_tok, *(torch.full_like(t, s) for s in
                                                                               (s_row, s_kv, s_head))], 1) // hd)
            out.append(torch.cat(parts).to(arena.data.device) if parts else
                       torch.zeros(0, 4, dtype=torch.long, device=arena.data.device))
        return out

    def read_arena(self, table: PageTable, a: int) -> torch.Tensor:
        """(rows, 2, KVH, kept, hd) of one arena: a view when the pages are one run, else a copy."""
        arena = self.arenas[a]
        chunks = table.cross_views[a]
        if len(chunks) == 1:
            return chunks[0]
        if not chunks:
            return torch.empty(arena.cross_rows, 2, self.kv_heads, 0, self.head_dim, dtype=arena.data.dtype,
                               device=arena.data.device)
        return torch.cat(chunks, dim=3)

    def cross_pool(self, kv_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """"page" layout: K and V page pools of one cross layer, (pages, tokens, KVH, hd), for a block table."""
        a, row = self.where[True, kv_layer]
        arena = self.arenas[a]
        pages = arena.data.view(-1, arena.cross_rows, 2, self.cross_block_size, self.kv_heads, self.head_dim)
        return pages[:, row, 0], pages[:, row, 1]

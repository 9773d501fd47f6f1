"""Paged KV memory: the arenas (arena.py) sized by the byte budget, their pages handed out by the block manager to
sequences' page tables (page_table.py), and the reads and writes of K/V through a table. A layer is addressed by
its kv_layer (its ordinal among the self or the cross layers), a token position by its slot."""

import itertools

import numpy as np
import torch

from pipeline.engine.arena import ArenaLayout
from pipeline.engine.block_manager import BlockManager
from pipeline.engine.page_table import PageTable
from pipeline.engine.prefix_cache import PrefixCache


class KVCache:
    def __init__(self, budget_bytes: int, num_layers: int, cross_layers: list[int], kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, block_size: int = 16, cross_layout: str = "run",
                 placement: list[int] | None = None, devices: list | None = None, prefix_model: str | None = None):
        """placement[i]: the index in `devices` of layer i's device (None: every layer on `device`);
        prefix_model: the model's id, to key a prefix cache of self-attention pages by (None: no prefix cache)."""
        devices = [torch.device(d) for d in (devices or [device])]
        self.device = devices[0]
        self.layout = ArenaLayout(budget_bytes, num_layers, cross_layers, kv_heads, head_dim, dtype, devices,
                                  block_size, cross_layout, placement or [0] * num_layers)
        self.prefix = None if prefix_model is None else PrefixCache(self.layout.block_size, prefix_model)
        self.blocks = BlockManager(self.layout.num_pages, self.layout.page_bytes, self.prefix)
        self.kv_layer = self.layout.kv_layer  # layer index -> kv_layer
        self.block_size, self.cross_block_size = self.layout.block_size, self.layout.cross_block_size
        self.num_self, self.num_cross = self.layout.num_self, self.layout.num_cross
        self._allocations = itertools.count()  # PageTable.allocation: tells apart cross K/V written at different times

    @property
    def arenas(self):
        return self.layout.arenas

    def self_layer(self, kv_layer: int) -> torch.Tensor:
        """One self-attention layer's K/V over every slot, (slots, 2, KVH, hd), on the layer's device."""
        return self.layout.self_layer(kv_layer)

    def cross_pool(self, kv_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layout.cross_pool(kv_layer)

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

    def written_bytes(self, table: PageTable) -> int:
        """Bytes of K/V actually written for a sequence (held pages minus their unwritten tail)."""
        layout = self.layout
        tokens = table.self_written * self.num_self + table.cross_tokens * self.num_cross
        return tokens * layout.token_elems * layout.itemsize

    def admission_pages(self, self_tokens: int, cross_tokens: int, cached: list[int] = (),
                        counted: set[int] = frozenset()) -> int:
        """Free pages an allocation takes when its first pages are the prefix cache's `cached` ones: a cached page
        counts once, whoever holds it (taking one no one holds, and not in `counted`, uses up a free page)."""
        revived = sum(1 for p in cached if self.blocks.refs[p] == 0 and p not in counted)
        return self.pages_needed(self_tokens, cross_tokens) - len(cached) + revived

    def written_bytes_held(self, tables: list[PageTable]) -> int:
        """Bytes of K/V written in the pages these tables hold, a page several of them share (n > 1 siblings, a
        cached prefix) counted once, as the pool holds it."""
        size, written, cross = self.block_size, np.zeros(self.blocks.num_pages, dtype=np.int64), {}
        for t in tables:
            full, rest = divmod(t.self_written, size)
            written[t.self_pages[:full]] = size
            if rest:
                written[t.self_pages[full]] = max(int(written[t.self_pages[full]]), rest)
            cross[t.allocation] = t.cross_tokens  # forks share their cross pages: the same allocation
        tokens = int(written.sum()) * self.num_self + sum(cross.values()) * self.num_cross
        return tokens * self.layout.token_elems * self.layout.itemsize

    # --- pages of one sequence ---------------------------------------------------------------------------
    def allocate(self, self_tokens: int, cross_tokens: int, watermark: int = 0,
                 cached: list[int] = ()) -> PageTable | None:
        """Pages for the first `self_tokens` positions and every kept visual token, the first self pages shared
        from the prefix cache (`cached`, see prefix_hit); None if they do not fit."""
        n_self = -(-self_tokens // self.block_size)
        n_cross = -(-cross_tokens // self.cross_block_size)
        if not self.blocks.can_allocate(self.admission_pages(self_tokens, cross_tokens, cached), watermark):
            return None
        self.blocks.share(list(cached))  # first: held now, so the allocations below cannot evict them
        table = PageTable(self.block_size, self.device, next(self._allocations),
                          cross_pages=self.blocks.allocate(n_cross), cross_tokens=cross_tokens)
        table.self_pages = list(cached) + self.blocks.allocate(n_self - len(cached),
                                                                after=cached[-1] if cached else None)
        table.reindex()
        table.cross_views = [self.layout.cross_chunks(table, arena) for arena in self.arenas]
        table.cross_rows = self.layout.cross_rows(table)
        return table

    def grow(self, table: PageTable, self_tokens: int) -> bool:
        """Room to write position self_tokens - 1: one more page when the last is full, or a private copy of the
        last page when it is shared (copy on write); False if no page is free."""
        need = -(-self_tokens // self.block_size) - len(table.self_pages)
        last = (self_tokens - 1) // self.block_size
        if need <= 0 and self.blocks.refs[table.self_pages[last]] == 1:
            return True
        if not self.blocks.can_allocate(max(need, 1)):
            return False
        if need > 0:
            table.self_pages += self.blocks.allocate(need, after=table.self_pages[-1] if table.self_pages else None)
        else:
            shared = table.self_pages[last]
            (page,) = self.blocks.allocate(1, after=table.self_pages[last - 1] if last else None)
            size = self.block_size
            for arena in self.arenas:
                view = arena.self_view
                view[page * size : (page + 1) * size] = view[shared * size : (shared + 1) * size]
            self.blocks.free([shared])
            table.self_pages[last] = page
        table.reindex()
        return True

    def prefix_hit(self, hashes: list[bytes], prompt_len: int) -> list[int]:
        """The cached pages a prompt may start with: the longest cached run of its page hashes, never its last row
        (its logits give the first token)."""
        if self.prefix is None:
            return []
        return self.prefix.match(hashes[: (prompt_len - 1) // self.block_size])

    def reset_prefix(self) -> int:
        """Forget every cached prefix page; pages sequences hold stay theirs. How many pages were cached."""
        n = 0 if self.prefix is None else self.prefix.cached_pages
        self.blocks.reset_prefix()
        return n

    def register(self, table: PageTable, hashes: list[bytes], rows: int) -> None:
        """The sequence's pages fully written among its first `rows` positions into the prefix cache."""
        n = min(rows // self.block_size, len(hashes))
        self.blocks.register(hashes[:n], table.self_pages[:n])

    def fork(self, table: PageTable) -> PageTable:
        """A second holder of every page (n > 1): the image's and the prompt's K/V are stored once."""
        self.blocks.share(table.self_pages)
        self.blocks.share(table.cross_pages)
        return table.copy()

    def shed_cross(self, table: PageTable, keep_tokens: int) -> int:
        """Elastic shedding: keep the first `keep_tokens` kept tokens (stored best first: trimmer._select) and free
        the cross pages past them. "page" layout (every page laid out alone): no copy. "run" layout: a run of pages
        is laid out as a whole (layers, 2, KVH, T, hd), so its last pages hold part of every token; the kept tokens
        are copied once into the run's first pages. The table's views and rows follow, and a new allocation serial
        drops batched reads cached for the old set (attention.py). Returns the pages freed."""
        keep_pages = -(-keep_tokens // self.cross_block_size)
        freed = table.cross_pages[keep_pages:]
        kept = None
        if self.layout.cross_layout == "run":
            kept = [self.layout.read_arena(table, a)[:, :, :, :keep_tokens].clone() for a in range(len(self.arenas))]
        self.blocks.free(freed)
        table.cross_pages, table.cross_tokens = table.cross_pages[:keep_pages], keep_tokens
        table.allocation = next(self._allocations)
        table.cross_views = [self.layout.cross_chunks(table, arena) for arena in self.arenas]
        table.cross_rows = self.layout.cross_rows(table)
        for chunks, part in zip(table.cross_views, kept or []):
            for chunk, piece in zip(chunks, part.split([c.shape[3] for c in chunks], dim=3)):
                chunk.copy_(piece)
        return len(freed)

    def release(self, table: PageTable) -> None:
        self.blocks.free(table.self_pages)
        self.blocks.free(table.cross_pages)
        table.self_pages, table.cross_pages, table.cross_views, table.cross_rows = [], [], [], []

    # --- reads and writes ---------------------------------------------------------------------------------
    def self_kv(self, table: PageTable, kv_layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [0, n) of one self-attention layer: (KVH, n, hd) each, a view when possible."""
        layer = self.self_layer(kv_layer)
        if table.self_base is not None:
            x = layer[table.self_base : table.self_base + n]
        else:
            x = layer.index_select(0, table.self_index[:n].to(layer.device))
        return x[:, 0].transpose(0, 1), x[:, 1].transpose(0, 1)

    def write_cross(self, table: PageTable, cross: torch.Tensor) -> None:
        """cross: (cross layers, 2, KVH, kept, hd); each arena takes its layers' rows."""
        for arena, chunks in zip(self.arenas, table.cross_views):
            rows, start = len(arena.cross_layers), 0
            for chunk in chunks:
                chunk[:rows].copy_(cross[arena.cross_layers, :, :, start : start + chunk.shape[3]])
                start += chunk.shape[3]

    def read_cross(self, table: PageTable, device=None) -> torch.Tensor:
        """(cross layers, 2, KVH, kept, hd) on `device` (default: the first device)."""
        parts = [self.layout.read_arena(table, a) for a in range(len(self.arenas))]
        device = device or self.device
        if len(parts) == 1:
            return parts[0][: self.num_cross].to(device)
        return torch.stack([parts[a][row].to(device) for a, row in (self.layout.where[True, c]
                                                                    for c in range(self.num_cross))])

    def cross_kv(self, table: PageTable, kv_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one cross-attention layer: (KVH, kept, hd) each, on the layer's device."""
        a, row = self.layout.where[True, kv_layer]
        chunks = table.cross_views[a]
        # Fragmented pages: copy this layer's row only, not the arena's every row.
        x = chunks[0][row] if len(chunks) == 1 else torch.cat([c[row] for c in chunks], dim=2)
        return x[0], x[1]

    def cross_kv_chunks(self, table: PageTable, kv_layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """cross_kv as views, one (K, V) pair per contiguous run of the sequence's pages: no copy however fragmented."""
        a, row = self.layout.where[True, kv_layer]
        return [(c[row, 0], c[row, 1]) for c in table.cross_views[a]]

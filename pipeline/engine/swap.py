"""Preemption's copies: what a sequence wrote in its KV pages goes to host memory (its pages freed), and comes back
into fresh pages when they free up; that host memory is bounded (SwapSpace), by an admission rule that keeps a
preemption's copy always within it."""

from collections import Counter
from dataclasses import dataclass

import torch

from pipeline.engine.kv_cache import KVCache
from pipeline.engine.page_table import PageTable


@dataclass
class SwappedKV:
    """A preempted sequence's K/V on the host, per arena."""

    self_parts: list[torch.Tensor]  # (written, self_rows, 2, KVH, hd)
    cross_parts: list[torch.Tensor]  # (cross_rows, 2, KVH, kept, hd)
    self_written: int
    cross_tokens: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.self_parts + self.cross_parts)


def swap_out(cache: KVCache, table: PageTable) -> SwappedKV:
    """Copy what the sequence wrote to host memory and free its pages."""
    slots = table.self_slots(0, table.self_written)
    layout = cache.layout
    saved = SwappedKV([a.self_view[slots.to(a.data.device)].to("cpu", copy=True) for a in layout.arenas],
                      [layout.read_arena(table, i).to("cpu", copy=True) for i in range(len(layout.arenas))],
                      table.self_written, table.cross_tokens)
    cache.release(table)
    return saved


def swap_in(cache: KVCache, saved: SwappedKV, self_tokens: int, watermark: int = 0) -> PageTable | None:
    """Fresh pages for `self_tokens` positions and the cross tokens, filled from `saved`; None if they do not fit."""
    table = cache.allocate(self_tokens, saved.cross_tokens, watermark)
    if table is None:
        return None
    table.self_written = saved.self_written
    slots = table.self_slots(0, table.self_written)
    for arena, chunks, self_part, cross_part in zip(cache.arenas, table.cross_views, saved.self_parts,
                                                    saved.cross_parts):
        arena.self_view[slots.to(arena.data.device)] = self_part.to(arena.data.device)
        for chunk, part in zip(chunks, cross_part.split([c.shape[3] for c in chunks], dim=3)):
            chunk.copy_(part)
    return table


class SwapSpace:
    """Host memory for preempted sequences, at most `limit_bytes`, and the admission rule that keeps it so.

    A sequence's worst case is the pages it holds at its max_tokens (a request of n completions commits n of them at
    its admission, before its siblings fork). The engine admits a sequence only while the
    worst cases of every sequence it holds (running or swapped) fit the pool plus the swap space less the largest
    worst case. Then whenever a running sequence finds no free page, the swapped ones hold at most the swap space
    less the largest worst case less one page (the pool is full and the needing sequence is below its worst, or
    shares the page it must copy), so any victim's copy fits. With less swap space than the largest worst case the
    rule is "the worst cases fit the pool": nothing is ever preempted, admission holds instead."""

    def __init__(self, limit_bytes: int, page_bytes: int, pool_pages: int):
        self.limit_bytes, self.used_bytes = limit_bytes, 0
        self.pool_pages, self.spare_pages = pool_pages, limit_bytes // page_bytes
        self.committed = 0  # worst-case pages of every admitted sequence not finished
        self.worst_cases: Counter[int] = Counter()  # worst-case pages -> how many admitted sequences have it

    @property
    def largest(self) -> int:
        """The largest worst case among the admitted sequences (0 when none)."""
        return max(self.worst_cases, default=0)

    def limit(self, largest: int) -> int:
        """Worst-case pages the engine may commit while `largest` is the largest of them: the pool and the swap
        space less the largest (the pool alone when the swap space cannot take the largest)."""
        return self.pool_pages + max(0, self.spare_pages - largest)

    def commit(self, worst: int, n: int = 1) -> None:
        """n sequences of `worst` pages admitted (a request's n completions at once)."""
        self.committed += n * worst
        self.worst_cases[worst] += n

    def release(self, worst: int, n: int = 1) -> None:
        """n committed sequences finished."""
        self.committed -= n * worst
        self.worst_cases[worst] -= n
        if not self.worst_cases[worst]:
            del self.worst_cases[worst]

    def swap_out(self, cache: KVCache, table: PageTable) -> SwappedKV:
        need = cache.written_bytes(table)
        if self.used_bytes + need > self.limit_bytes:  # the admission rule makes this impossible
            raise RuntimeError(f"swap space full ({self.used_bytes} + {need} > {self.limit_bytes} bytes)")
        saved = swap_out(cache, table)
        self.used_bytes += saved.nbytes
        return saved

    def swap_in(self, cache: KVCache, saved: SwappedKV, self_tokens: int) -> PageTable | None:
        table = swap_in(cache, saved, self_tokens)
        if table is not None:
            self.used_bytes -= saved.nbytes
        return table

    def drop(self, saved: SwappedKV) -> None:
        """A swapped sequence finished (aborted) without coming back."""
        self.used_bytes -= saved.nbytes

"""Preemption's copies: what a sequence wrote in its KV pages goes to host memory (its pages freed), and comes back
into fresh pages when they free up."""

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
    for arena, self_part, cross_part in zip(cache.arenas, saved.self_parts, saved.cross_parts):
        arena.self_view[slots.to(arena.data.device)] = self_part.to(arena.data.device)
        chunks = cache.layout.cross_chunks(table, arena)
        for chunk, part in zip(chunks, cross_part.split([c.shape[3] for c in chunks], dim=3)):
            chunk.copy_(part)
    return table

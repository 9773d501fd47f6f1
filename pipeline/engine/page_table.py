"""A sequence's page table: which KV pages hold its self-attention positions and its kept visual tokens, and the
flat token slots its positions map to (one run of pages: a base slot; fragmented: an index of every slot)."""

from dataclasses import dataclass, field, replace

import torch

from pipeline.engine.block_manager import runs


@dataclass
class PageTable:
    block_size: int  # self tokens a page: slot s of page p is p * block_size + s
    device: torch.device  # where the slot index lives
    allocation: int  # its KV cache's serial of the allocation: the same cross K/V (forks share it) iff the same serial
    self_pages: list[int] = field(default_factory=list)
    cross_pages: list[int] = field(default_factory=list)
    cross_tokens: int = 0
    self_written: int = 0  # self-attention positions holding K/V (bytes written, for utilisation)
    self_base: int | None = None  # slot of position 0 when the self pages are one run
    self_index: torch.Tensor | None = None  # slots of every held position, for a gather when fragmented
    cross_views: list[list[torch.Tensor]] = field(default_factory=list)  # per arena, its chunks (rows, 2, KVH, n, hd)
    cross_rows: list[torch.Tensor] = field(default_factory=list)  # per arena (kept, 4): see ArenaLayout.cross_rows

    def reindex(self) -> None:
        """Recompute the slots after the self pages changed."""
        pages, size = self.self_pages, self.block_size
        if runs(pages) <= 1:
            self.self_base, self.self_index = (pages[0] * size if pages else 0), None
        else:
            p = torch.tensor(pages, device=self.device)
            self.self_base = None
            self.self_index = (p[:, None] * size + torch.arange(size, device=self.device)).flatten()

    def self_slots(self, start: int, end: int) -> torch.Tensor:
        """Slots of positions [start, end)."""
        if self.self_base is not None:
            return torch.arange(self.self_base + start, self.self_base + end, device=self.device)
        return self.self_index[start:end]

    def self_slot(self, pos: int) -> int:
        if self.self_base is not None:
            return self.self_base + pos
        return self.self_pages[pos // self.block_size] * self.block_size + pos % self.block_size

    def copy(self) -> "PageTable":
        """Another holder's table of the same pages (the caller shares them in the block manager)."""
        return replace(self, self_pages=list(self.self_pages), cross_pages=list(self.cross_pages))

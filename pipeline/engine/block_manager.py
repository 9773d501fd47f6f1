"""Fixed-size KV pages: which are free, who holds them (reference-counted), and where to place new ones so that
a sequence's pages stay one contiguous run as long as memory allows (a run is read as a view, not gathered).
With a prefix cache (prefix_cache.py), a page no one holds may still be cached: it counts as free, and is evicted
(least recently used first) only when no empty page is left."""

from itertools import pairwise

import numpy as np

from pipeline.engine.prefix_cache import PrefixCache


class BlockManager:
    def __init__(self, num_pages: int, page_bytes: int, prefix: PrefixCache | None = None):
        self.num_pages, self.page_bytes = num_pages, page_bytes
        self.refs = np.zeros(num_pages, dtype=np.int32)  # 0 = free
        self.used = 0  # pages with refs > 0
        self.prefix = prefix
        self.cached = np.zeros(num_pages, dtype=bool)  # registered in the prefix cache (held or not)

    @property
    def free_pages(self) -> int:
        return self.num_pages - self.used

    @property
    def used_bytes(self) -> int:
        return self.used * self.page_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    def can_allocate(self, n: int, watermark: int = 0) -> bool:
        return n + watermark <= self.free_pages

    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """n pages: right after page `after` when those are free (the sequence's run grows in place), else the
        middle of the largest free run (its neighbours keep room to grow), else pieces of the largest runs."""
        assert n <= self.free_pages, "caller checks can_allocate"
        if n == 0:
            return []
        if self.prefix is not None and n > self.free_pages - len(self.prefix.unheld):  # too few empty pages
            self.cached[self.prefix.evict(n - self.free_pages + len(self.prefix.unheld))] = False
        taken = (self.refs != 0) | self.cached
        if after is not None and after + n < self.num_pages and not taken[after + 1 : after + 1 + n].any():
            pages = list(range(after + 1, after + 1 + n))
        else:
            pages = []
            for start, length in self._free_runs():  # largest first
                take = min(length, n - len(pages))
                offset = (length - take) // 2
                pages += range(start + offset, start + offset + take)
                if len(pages) == n:
                    break
        self.refs[pages] = 1
        self.used += n
        return pages

    def share(self, pages: list[int]) -> None:
        """One more holder of these pages (n > 1 sequences share the prompt's and the image's pages; a prefix cache
        hit shares cached pages, which may be held by no one until now)."""
        if not pages:
            return
        idx = np.asarray(pages)
        revived = idx[self.refs[idx] == 0]
        assert self.cached[revived].all(), "only a cached page is shared while free"
        self.used += len(np.unique(revived))
        if len(revived) and self.prefix is not None:
            self.prefix.hold(revived.tolist())
        self.refs[idx] += 1

    def register(self, hashes: list, pages: list[int]) -> None:
        """Fully written pages into the prefix cache (see PrefixCache.register)."""
        if self.prefix is not None:
            self.cached[self.prefix.register(hashes, pages)] = True

    def reset_prefix(self) -> None:
        """Drop the prefix cache's every entry: its unheld pages become empty."""
        if self.prefix is not None:
            self.prefix.reset()
            self.cached[:] = False

    @property
    def unheld_cached(self) -> int:
        """Free pages that still hold a cached prefix."""
        return 0 if self.prefix is None else len(self.prefix.unheld)

    def free(self, pages: list[int]) -> None:
        if not pages:
            return
        idx = np.asarray(pages)
        self.refs[idx] -= 1
        assert (self.refs[idx] >= 0).all(), "page freed twice"
        self.used -= int((self.refs[np.unique(idx)] == 0).sum())
        if self.prefix is not None:
            self.prefix.unhold([p for p in pages if self.refs[p] == 0 and self.cached[p]])

    def _free_runs(self) -> list[tuple[int, int]]:
        """(start, length) of every run of empty pages (free and not cached), largest first (ties: lowest start)."""
        free = np.concatenate(([0], ((self.refs == 0) & ~self.cached).astype(np.int8), [0]))
        edges = np.flatnonzero(np.diff(free))
        starts, ends = edges[0::2], edges[1::2]
        order = np.lexsort((starts, -(ends - starts)))
        return [(int(starts[i]), int(ends[i] - starts[i])) for i in order]


def runs(pages: list[int]) -> int:
    """How many contiguous runs the pages form, in order."""
    return 1 + sum(1 for a, b in pairwise(pages) if b != a + 1) if pages else 0

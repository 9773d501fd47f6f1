"""Prefix caching: full self-attention pages addressed by their content (a hash chain over the parent page's hash,
the page's token ids, the model and the cache salt), shared by every sequence whose prompt starts with them, kept
after their holders end (free, but evictable least recently used first) until the pool needs the page.

Only rows whose K/V in every layer depends on their tokens alone are cacheable: a text-only prompt's, and an image
prompt's rows before its first image token (Meta's reference gives them no cross-attention output). The hashes
(pipeline/prefix_hash.py) are deterministic across processes, so the decoder pool's router computes the same ones
(deployments/router.py).
"""

from collections import OrderedDict

from pipeline.prefix_hash import namespace, page_hashes, route_key


def cached_prefix_pages(digest: dict, token_ids: list[int], salt: str | None) -> int:
    """How many leading full pages of a prompt a cache's digest (PrefixCache.digest) holds: the deepest page of
    the chain it holds (a page's hash covers every page before it)."""
    keys = set(digest["pages"])
    hashes = page_hashes(token_ids, digest["block_size"], namespace(digest["model_id"], salt), len(token_ids) - 1)
    return next((i + 1 for i in range(len(hashes) - 1, -1, -1) if route_key(hashes[i]) in keys), 0)


class PrefixCache:
    """hash -> page for the pages registered, and the LRU order of the ones no sequence holds (free to reuse:
    the block manager counts them free and evicts them when it runs out of empty pages)."""

    def __init__(self, block_size: int, model_id: str):
        self.block_size, self.model_id = block_size, model_id
        self.page_of: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.unheld: OrderedDict[int, None] = OrderedDict()  # cached, held by no sequence: least recently used first
        self.queried_tokens = self.hit_tokens = 0  # prompt rows looked up at admission / taken from the cache
        self.evictions = 0

    @property
    def cached_pages(self) -> int:
        return len(self.page_of)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def hashes(self, token_ids: list[int], rows: int, salt: str | None) -> list[bytes]:
        return page_hashes(token_ids, self.block_size, namespace(self.model_id, salt), rows)

    def digest(self) -> dict:
        """What a router needs to tell whether this cache holds a request's prefix: the page size, the model, and
        the short form (route_key) of every cached page's hash (read off the step thread: list() of a dict of
        bytes keys runs without a switch of threads)."""
        return {"block_size": self.block_size, "model_id": self.model_id,
                "pages": [route_key(h) for h in list(self.page_of)]}

    def match(self, hashes: list[bytes]) -> list[int]:
        """Pages of the longest cached prefix of `hashes`."""
        pages = []
        for h in hashes:
            page = self.page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def count(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def register(self, hashes: list[bytes], pages: list[int]) -> list[int]:
        """Cache fully written pages under their hashes; a hash already cached (the same page computed by another
        sequence meanwhile) keeps its page, the duplicate stays private. Returns the pages newly cached."""
        added = []
        for h, page in zip(hashes, pages):
            if h not in self.page_of and page not in self.hash_of:
                self.page_of[h], self.hash_of[page] = page, h
                added.append(page)
        return added

    def unhold(self, pages: list[int]) -> None:
        """Cached pages no sequence holds any more: the most recently used end of the LRU, the chain's tail
        evicted before its head (a head's loss would strand the pages chained on it)."""
        for page in reversed(pages):
            if page in self.hash_of:
                self.unheld[page] = None

    def hold(self, pages: list[int]) -> None:
        """Cached pages a sequence takes again: no longer evictable."""
        for page in pages:
            self.unheld.pop(page, None)

    def evict(self, n: int) -> list[int]:
        """The n least recently used unheld pages, uncached (they become empty)."""
        out = []
        for _ in range(n):
            page, _ = self.unheld.popitem(last=False)
            del self.page_of[self.hash_of.pop(page)]
            out.append(page)
        self.evictions += len(out)
        return out

    def reset(self) -> list[int]:
        """Forget every cached page (held ones stay with their holders, now private); returns the unheld ones,
        which become empty."""
        out = list(self.unheld)
        self.page_of.clear()
        self.hash_of.clear()
        self.unheld.clear()
        return out

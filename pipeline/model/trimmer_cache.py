"""The trimmer's prefix cache: the self-attention K/V of its layers (those before the first cross-attention layer)
for full pages of blind-prefix rows, addressed by the decoder's hash chain (parent page, token ids, model, cache
salt), so a shared system prompt runs through the trimmer once and later requests compute and ship only their own
rows (docs/prefix_caching.md).

It is the trimmer's own, bounded by bytes, least recently used first out: the decoder's cache is paged and lives in
another process, and shipping it here would cost a hop per request. On CPU at the 11B's widths recomputing 1,000
rows through the 3 layers took 13.3 s against 0.04 s for moving their K/V (BENCHMARKS.md)."""

from collections import OrderedDict

import torch

from pipeline.engine.arena import self_page_tokens
from pipeline.prefix_hash import namespace, page_hashes, route_key


class TrimmerPrefixCache:
    """hash -> (first_cross, 2, KVH, block_size, hd) K/V of one page of rows; bytes bounded, LRU."""

    def __init__(self, max_bytes: int, block_size: int, model_id: str):
        self.max_bytes, self.block_size, self.model_id = max_bytes, block_size, model_id
        self.pages: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.queried_rows = self.hit_rows = self.evictions = 0

    def hashes(self, token_ids: list[int], rows: int, salt: str | None) -> list[bytes]:
        """The chain of the full pages among a prompt's first `rows` rows (its blind prefix)."""
        return page_hashes(token_ids, self.block_size, namespace(self.model_id, salt), rows)

    def match(self, hashes: list[bytes]) -> list[torch.Tensor]:
        """K/V of the longest cached run of `hashes` from the first (each page's hash covers every page before it),
        marked recently used."""
        out = []
        for h in hashes:
            kv = self.pages.get(h)
            if kv is None:
                break
            out.append(kv)
        self._used(hashes[: len(out)])
        return out

    def _used(self, chain: list[bytes]) -> None:
        """A chain's pages to the recently used end, its head last: the tail is evicted before the head, whose loss
        would strand every page chained on it."""
        for h in reversed(chain):
            self.pages.move_to_end(h)

    def count(self, queried: int, hit: int) -> None:
        self.queried_rows += queried
        self.hit_rows += hit

    def put(self, hashes: list[bytes], kv: torch.Tensor) -> None:
        """Cache pages: hashes[i] -> kv[..., i * block_size : (i + 1) * block_size, :] of kv (layers, 2, KVH, rows,
        hd); each page is copied out, so the cache never pins a batch's tensor. Evicts down to max_bytes."""
        b = self.block_size
        for i, h in enumerate(hashes):
            if h not in self.pages:
                self.pages[h] = kv[..., i * b : (i + 1) * b, :].clone()
                self.bytes += self.pages[h].nbytes
        self._used(hashes)
        while self.bytes > self.max_bytes:
            _, page = self.pages.popitem(last=False)
            self.bytes -= page.nbytes
            self.evictions += 1

    def reset(self) -> int:
        """Forget every page; how many there were."""
        n = len(self.pages)
        self.pages.clear()
        self.bytes = 0
        return n

    @classmethod
    def sized(cls, mib: int, block_size: int, loaded) -> "TrimmerPrefixCache | None":
        """A cache of `mib` MiB paged and keyed as a decoder engine over the same model pages and keys its own
        (the configured block_size as its layout rounds it, LoadedModel.cache_id); None for 0."""
        if not mib:
            return None
        tokens = self_page_tokens(block_size, loaded.text_config.num_hidden_layers, loaded.cross_layers,
                                  loaded.device)
        return cls(mib * 2**20, tokens, loaded.cache_id)

    def digest(self) -> dict:
        """What the trimmer pool's router needs to tell whether this cache holds a request's prefix, in the decoder
        cache's form (PrefixCache.digest): the page size, the model, each cached page's route key (list() of the
        dict's bytes keys runs without a switch of threads: safe beside a trim in another thread)."""
        return {"block_size": self.block_size, "model_id": self.model_id,
                "pages": [route_key(h) for h in list(self.pages)]}

    def stats(self) -> dict:
        return {"cached_pages": len(self.pages), "cached_bytes": self.bytes, "queried_rows": self.queried_rows,
                "hit_rows": self.hit_rows, "hit_rate": round(self.hit_rows / self.queried_rows, 4)
                if self.queried_rows else 0.0, "evictions": self.evictions}

"""TrimmerPrefixRouter, the Ray Serve request router of the Trimmer pool: send each request to the replica whose
prefix cache holds the longest run of its prompt's blind-prefix pages, unless that replica has more than a batch's
worth of requests in flight beyond the least busy one; else to the least busy (docs/prefix_caching.md)."""

from ray.serve.request_router import PendingRequest

from pipeline.engine.prefix_cache import cached_prefix_pages

from .router import RankingRouter

# Requests in flight a replica holding the prefix may have beyond the least busy one and still be preferred: a
# trimmer runs concurrent calls as one batch (trimmer_batching.max_batch_size, 8 by default), so waiting behind one
# batch is cheaper than recomputing a long system prompt elsewhere; more would pile a shared prompt's every request
# onto one replica.
SLACK = 8


def rank_by_prefix(candidates: list, ongoing: dict, prompt: tuple[list[int], str | None] | None = None,
                   slack: int = SLACK) -> list:
    """Candidates best first by (pages of `prompt` (token ids, cache salt) its cache holds, while it is within
    `slack` requests of the least busy; fewer requests in flight). `candidates` need `.replica_id` and
    `.routing_stats` (the replica's record_routing_stats, with the cache's digest as "prefix")."""
    least = min((ongoing.get(r.replica_id, 0) for r in candidates), default=0)

    def score(replica):
        n = ongoing.get(replica.replica_id, 0)
        digest = (replica.routing_stats or {}).get("prefix")
        cached = cached_prefix_pages(digest, *prompt) if prompt and digest and n <= least + slack else 0
        return cached, -n

    return sorted(candidates, key=score, reverse=True)


class TrimmerPrefixRouter(RankingRouter):
    """Trimmer replicas report their prefix cache's digest (TrimmerPrefixCache.digest) from `record_routing_stats`;
    requests in flight come from Serve's queue-length cache."""

    def rank(self, candidates, ongoing, pending):
        return rank_by_prefix(candidates, ongoing, prompt_of(pending))


def prompt_of(pending: PendingRequest | None) -> tuple[list[int], str | None] | None:
    """(token ids, cache salt) of a Trimmer.trim(prompt, visual, cfg) call, if that is one."""
    args = pending.args if pending is not None else ()
    ids = getattr(args[0], "input_ids", None) if args else None
    if ids is None:
        return None
    return ids.tolist(), getattr(args[0], "cache_salt", None)

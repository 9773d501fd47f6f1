"""KVBudgetRouter, the Ray Serve request router of DecoderPool: send each request to the replica that holds the
longest cached prefix of its prompt while its free KV allows the request, else to the one with the most free KV
budget (and room in its engine's queue)."""

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from pipeline.engine.prefix_cache import cached_prefix_pages


def rank_by_free_kv(candidates: list, ongoing: dict, prompt: tuple[list[int], str | None] | None = None) -> list:
    """Candidates best first by (room in the engine's queue, pages of `prompt` (token ids, cache salt) its prefix
    cache holds where its free KV fits a request, free KV bytes net of requests sent since the report, fewer
    requests in flight). `candidates` need `.replica_id` and `.routing_stats`."""
    reported = [r.routing_stats for r in candidates if r.routing_stats]
    # One estimate of a request's KV for every replica: requests do not depend on where they land.
    request_bytes = max([s["avg_request_kv_bytes"] for s in reported] + [0])
    # A replica that has not reported yet (just started) counts as free as the freest one.
    prior = {"kv_free_bytes": max([s["kv_free_bytes"] for s in reported] + [0]), "requests": 0,
             "capacity": float("inf")}

    def score(replica):
        n = ongoing.get(replica.replica_id, 0)
        stats = replica.routing_stats or prior
        since = max(0, n - stats["requests"])
        free = stats["kv_free_bytes"] - since * request_bytes
        cached = 0
        if prompt is not None and stats.get("prefix") and free >= request_bytes:
            cached = cached_prefix_pages(stats["prefix"], *prompt)
        return n < stats["capacity"], cached, free, -n

    return sorted(candidates, key=score, reverse=True)


class RankingRouter(FIFOMixin, RequestRouter):
    """A request router that ranks the candidates (`rank`), given each one's requests in flight (Serve's
    queue-length cache), and offers them one per rank: Serve tries them in order, skipping any at
    max_ongoing_requests."""

    def rank(self, candidates: list[RunningReplica], ongoing: dict, pending: PendingRequest | None) -> list:
        raise NotImplementedError

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        cache = self.replica_queue_len_cache
        ongoing = {r.replica_id: cache.get(r.replica_id) or 0 for r in candidate_replicas}
        return [[r] for r in self.rank(candidate_replicas, ongoing, pending_request)]


class KVBudgetRouter(RankingRouter):
    """Replicas report {"kv_free_bytes", "requests", "capacity", "avg_request_kv_bytes"} from
    `record_routing_stats` every `request_routing_stats_period_s`; between reports a replica is discounted by the
    requests it holds beyond the reported ones (Serve's queue-length cache), so a burst spreads instead of piling
    onto the replica that looked emptiest at the last report."""

    def rank(self, candidates, ongoing, pending):
        return rank_by_free_kv(candidates, ongoing, prompt_of(pending))


def prompt_of(pending: PendingRequest | None) -> tuple[list[int], str | None] | None:
    """(token ids, cache salt) of a DecoderPool.generate(handoff, params, request_id) call, if that is one."""
    args = pending.args if pending is not None else ()
    payload = getattr(args[0], "payload", None) if args else None
    if payload is None or len(args) < 2:
        return None
    return payload.fields["prompt_token_ids"], getattr(args[1], "cache_salt", None)

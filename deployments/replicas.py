"""Every replica of a deployment, asked directly: a Serve handle routes each call to one replica, but /stats speaks
for the whole pool."""

import asyncio
import pickle
import uuid

import ray
from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX, RequestMetadata

# Summed over replicas; the rest are per-replica gauges for which the pool's worst (max) is the useful figure.
SUMMED = ("running", "waiting", "kv_used_bytes", "kv_budget_bytes", "tokens_generated", "steps", "decode_steps",
          "decode_rows", "last_batch_size", "peak_running", "peak_batch", "kv_written_bytes", "swapped",
          "preemptions", "prompt_rows_computed", "prefix_cached_tokens", "prefix_queried_tokens",
          "prefix_cached_pages", "prefix_unheld_pages", "prefix_evictions", "sheds", "shed_tokens")


def replica_actor_names(app: str, deployment: str) -> list[str]:
    prefix = f"{REPLICA_ID_FULL_ID_STR_PREFIX}{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


async def each_replica(app: str, deployment: str, method: str, timeout_s: float = 2.0, user: bool = False) -> dict:
    """Each live replica's answer to `method()` (no arguments) by actor name; None for one that does not answer in
    time. `user`: a method of the deployment's class, called through the replica actor's request entry point (as Ray
    Serve LLM's broadcast does; the replica actor's own methods, such as record_routing_stats, are called directly)."""
    names = await asyncio.to_thread(replica_actor_names, app, deployment)

    def call(actor):
        if not user:
            return getattr(actor, method).remote()
        rid = f"each-replica-{uuid.uuid4()}"
        return actor.handle_request.remote(pickle.dumps(RequestMetadata(request_id=rid, internal_request_id=rid,
                                                                        call_method=method)))

    async def one(name: str):
        try:
            return await asyncio.wait_for(call(ray.get_actor(name, namespace="serve")), timeout_s)
        except Exception:  # starting, stopping or dead: not part of the pool's figures now
            return None

    return dict(zip(names, await asyncio.gather(*(one(n) for n in names))))


async def replica_stats(app: str, deployment: str, timeout_s: float = 2.0) -> dict[str, dict | None]:
    """Each live replica's `record_routing_stats()` by actor name; None for one that does not answer in time."""
    return await each_replica(app, deployment, "record_routing_stats", timeout_s)


async def routing_stats(app: str, deployment: str, timeout_s: float = 2.0) -> list[dict]:
    """Each live replica's `record_routing_stats()`; a replica that does not answer in time is left out."""
    return [s for s in (await replica_stats(app, deployment, timeout_s)).values() if s]


def aggregate(engine_stats: list[dict]) -> dict:
    """One pool-wide view of several replicas' engine stats."""
    out = {"replicas": len(engine_stats)}
    for key in sorted({k for s in engine_stats for k in s}):
        values = [s[key] for s in engine_stats if key in s]
        out[key] = sum(values) if key in SUMMED else max(values)
    if out.get("prefix_queried_tokens"):  # the pool's hit rate: of every prompt row admitted, the cached share
        out["prefix_hit_rate"] = out["prefix_cached_tokens"] / out["prefix_queried_tokens"]
    return out

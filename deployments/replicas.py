"""Every replica of a deployment, asked directly: a Serve handle routes each call to one replica, but /stats speaks
for the whole pool."""

import asyncio

import ray
from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX

# Summed over replicas; the rest are per-replica gauges for which the pool's worst (max) is the useful figure.
SUMMED = ("running", "waiting", "kv_used_bytes", "kv_budget_bytes", "tokens_generated", "steps", "decode_steps",
          "decode_rows", "last_batch_size", "peak_running", "peak_batch", "kv_written_bytes", "swapped",
          "preemptions", "sheds", "shed_tokens")


def replica_actor_names(app: str, deployment: str) -> list[str]:
    prefix = f"{REPLICA_ID_FULL_ID_STR_PREFIX}{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


async def routing_stats(app: str, deployment: str, timeout_s: float = 2.0) -> list[dict]:
    """Each live replica's `record_routing_stats()`; a replica that does not answer in time is left out."""
    names = await asyncio.to_thread(replica_actor_names, app, deployment)

    async def one(name: str) -> dict | None:
        try:
            actor = ray.get_actor(name, namespace="serve")
            return await asyncio.wait_for(actor.record_routing_stats.remote(), timeout_s)
        except Exception:  # starting, stopping or dead: not part of the pool's figures now
            return None

    return [s for s in await asyncio.gather(*(one(n) for n in names)) if s]


def aggregate(engine_stats: list[dict]) -> dict:
    """One pool-wide view of several replicas' engine stats."""
    out = {"replicas": len(engine_stats)}
    for key in sorted({k for s in engine_stats for k in s}):
        values = [s[key] for s in engine_stats if key in s]
        out[key] = sum(values) if key in SUMMED else max(values)
    return out

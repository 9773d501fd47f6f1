"""Routing over two replicas of a pool, scaled in place (slow: each costs a redeploy, and the next default-config
test another): the decoder pool's KV router spreads a burst; the trimmer pool's prefix router keeps a shared system
prompt on the replica that holds it."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import data_url, decoder_stats, image, png, wait_for
from tests.serve.conftest import APP


@pytest.fixture()
def http(serve_app):
    with httpx.Client(base_url=serve_app.url, timeout=300) as c:
        yield c


@pytest.mark.slow  # docs/testing.md (it also costs the next default-config test a redeploy)
@pytest.mark.serve_in_place
def test_trimmer_router_sends_a_shared_system_prompt_to_the_replica_holding_it(serve_app, http):
    """Scale the Trimmer to 2 replicas in place; image requests behind one system prompt: after the first, 6 at once
    all go to the replica whose prefix cache holds the prompt (TrimmerPrefixRouter: within a batch of the least busy)
    and hit it; the other replica trims nothing (Serve's power-of-two router spreads such a burst)."""
    from ray import serve

    config = serve_app.session.config(deployments={"Trimmer": {"num_replicas": 2,
                                                                "ray_actor_options": {"num_cpus": 0.25}}})
    serve_app.session.deploy_in_place(config)

    def both_running():
        pool = serve.status().applications[APP].deployments["Trimmer"]
        caches = http.get("/stats").json()["trimmer_prefix_cache"]
        return pool.replica_states.get("RUNNING", 0) == 2 and pool.status == "HEALTHY" and len(caches) == 2

    wait_for(both_running, 600, "two Trimmer replicas running and reporting", interval=1.0)
    http.post("/reset_prefix_cache").raise_for_status()
    system = {"role": "system", "content": "You describe pictures of shapes, one cell at a time. " * 12}

    def ask(i: int) -> None:
        content = [{"type": "image_url", "image_url": {"url": data_url(png(image(64, 64, 40 + i)))}},
                   {"type": "text", "text": "which colour?"}]
        r = http.post("/v1/chat/completions", json={"messages": [system, {"role": "user", "content": content}],
                                                     "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text

    ask(0)
    time.sleep(2.5)  # two routing-stats periods: the router has the holder's digest
    with ThreadPoolExecutor(6) as pool:  # at once: a router by queue length alone would spread them
        list(pool.map(ask, range(1, 7)))
    caches = sorted(http.get("/stats").json()["trimmer_prefix_cache"], key=lambda c: c["rows_computed"])
    idle, holder = caches
    assert idle["rows_computed"] == 0 and idle["queried_rows"] == 0, caches
    assert holder["hit_rows"] >= 6 * 16 and holder["cached_pages"] > 0, caches


@pytest.mark.slow  # docs/testing.md (it also costs the next default-config test a redeploy: ~70 s in all)
@pytest.mark.serve_in_place
def test_decoder_router_spreads_over_two_replicas(serve_app, http):
    """Scale DecoderPool to 2 replicas in place; a burst of long requests lands on both, each replica reporting
    its free KV budget to the KVBudgetRouter."""
    import ray
    from ray import serve

    config = serve_app.session.config(deployments={"DecoderPool": {"num_replicas": 2,
                                                                    "ray_actor_options": {"num_cpus": 0.25}}})
    serve_app.session.deploy_in_place(config)

    def replicas():
        """Each DecoderPool replica's routing stats, asked of its actor directly."""
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::") and "#DecoderPool#" in a["name"]]
        try:
            handles = [ray.get_actor(n, namespace="serve") for n in names]
            stats = ray.get([h.record_routing_stats.remote() for h in handles], timeout=10)
        except Exception:  # a replica starting or stopping
            return None
        return stats if len(stats) == 2 else None

    wait_for(replicas, 600, "a second DecoderPool replica", interval=1.0)

    def both_running():  # the controller's view, which the ingress's handle follows (an actor answers before it)
        pool = serve.status().applications[APP].deployments["DecoderPool"]
        return pool.replica_states.get("RUNNING", 0) == 2 and pool.status == "HEALTHY"

    wait_for(both_running, 600, "Serve to mark both DecoderPool replicas running", interval=1.0)
    time.sleep(1.5)  # one routing-stats period, so the ingress's router has both reports

    async def burst():
        async with httpx.AsyncClient(base_url=serve_app.url, timeout=60) as c:
            reqs = [c.build_request("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"story {i}"}], "max_tokens": 400, "ignore_eos": True,
                "stream": True})
                for i in range(8)]
            responses = await asyncio.gather(*(c.send(r, stream=True) for r in reqs))
            # a busy replica may answer late on a loaded machine: ask again until both have (streams stay open)
            during = await asyncio.to_thread(wait_for, replicas, 120, "both replicas' routing stats", 0.5)
            stats = await asyncio.to_thread(decoder_stats, http, 2)  # the whole pool, not the replica a handle picks
            for r in responses:
                await r.aclose()
            return responses, during, stats

    responses, during, pool = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert during is not None, "could not read both replicas' routing stats"
    assert all(s["requests"] >= 1 for s in during), f"a replica got no request: {during}"
    assert all(s["capacity"] > 0 and s["kv_free_bytes"] > 0 for s in during)
    budget = pool["kv_budget_bytes"] // 2  # each replica's pages: the configured budget rounded down to whole pages
    configured = serve_app.config["applications"][0]["args"]["engine"]["kv_budget_bytes"]
    assert pool["replicas"] == 2 and configured * 0.99 < budget <= configured, pool
    assert pool["running"] + pool["waiting"] == 8, pool  # every request of the burst, wherever it landed
    wait_for(lambda: all(s["requests"] == 0 and s["kv_free_bytes"] == budget for s in replicas() or [{"requests": 1}]),
             120, "both replicas to free their KV")

"""Losing the head node under load, with GCS fault tolerance on a real Redis (Debian's redis-server on loopback):
a two-node `ray start` cluster whose head runs only the GCS, the Serve controller and a proxy; every replica and a
second proxy on the worker node. Clients stream 200-token answers through the WORKER node's proxy while (1) the
head's GCS process is killed and started again, then (2) the whole head node is killed and started again: no
request fails or is cut, requests keep being answered while the GCS is down, and the app recovers (controller back,
every deployment RUNNING, the head's proxy answering) without a redeploy, holding no KV afterwards.

Slow (~6-10 min on a shared 2-core machine); needs `apt-get install -y redis-server`. Figures are printed and
written to bench-results/upgrades/ (BENCHMARKS.md, "Upgrades and head-node loss")."""

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench-results" / "upgrades"
CLIENTS, MAX_TOKENS = 6, 200
TEXT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("redis-server") is None:
        print("SKIP: redis-server not installed (apt-get install -y redis-server)")
        pytest.skip("redis-server not installed (apt-get install -y redis-server)")
    from loadtests.headloss import HeadLossCluster, ft_config, wait_proxy
    from loadtests.redis_server import RedisServer

    redis = RedisServer(Path(tempfile.mkdtemp(prefix="ct-redis-"))).start()
    nodes = HeadLossCluster(redis)
    try:
        nodes.start()
        status = nodes.deploy(ft_config(nodes.http_port))
        assert all(d == {"RUNNING": 1} for d in status["deployments"].values()), status
        wait_proxy(nodes.worker_url, 180)
        assert redis.key_count() > 0, "the GCS wrote nothing to Redis"
        yield nodes
    finally:
        nodes.stop()
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)


def app_running(nodes) -> bool:
    try:
        s = nodes.status(timeout_s=90)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:  # no GCS yet, or it is still loading
        print(f"  status: {type(exc).__name__}: {str(exc)[-200:]}")
        return False
    return s["status"].endswith("RUNNING") and all(d == {"RUNNING": 1} for d in s["deployments"].values())


def head_proxy_answers(nodes) -> bool:
    try:
        return httpx.post(nodes.head_url + "/v1/chat/completions", json=TEXT, timeout=20).status_code == 200
    except httpx.HTTPError:
        return False


def wait_recovered(nodes, since: float, timeout_s: float = 300) -> float:
    """Seconds from `since` until the controller reports every deployment RUNNING and the head's proxy answers."""
    while time.monotonic() - since < timeout_s:
        if app_running(nodes) and head_proxy_answers(nodes):
            return time.monotonic() - since
        time.sleep(1)
    raise AssertionError(f"the app did not recover within {timeout_s}s")


def kv_after(nodes, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = httpx.get(nodes.worker_url + "/stats", timeout=30).json()["decoder"]
        if stats["kv_used_bytes"] == 0 and stats["running"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


def run_scenario(nodes, name: str, kill, restart, outage_s: float) -> dict:
    from loadtests.streams import StreamLoad

    load = StreamLoad(nodes.worker_url, clients=CLIENTS, max_tokens=MAX_TOKENS).start()
    try:
        t0 = time.monotonic()
        assert load.wait_for_ok(CLIENTS, t0, 180), load.summary()
        killed = time.monotonic()
        killed_what = kill()
        time.sleep(outage_s)
        restarted = time.monotonic()
        restart(killed_what)
        back = time.monotonic()
        recover_s = wait_recovered(nodes, restarted)
        time.sleep(5)  # streams that started after the recovery end too
    finally:
        load.stop()
    down = load.summary(since=killed, until=back)
    served_down = sum(o.kind == "ok" and o.started >= killed and o.ended <= restarted for o in load.snapshot())
    stats = kv_after(nodes)
    result = {"scenario": name, "clients": CLIENTS, "max_tokens": MAX_TOKENS, "outage_s": round(outage_s, 1),
              "restart_s": round(back - restarted, 1), "recover_s": round(recover_s, 1),
              "requests": load.summary(), "while_down": down, "started_and_answered_while_down": served_down,
              "kv_used_bytes_after": stats["kv_used_bytes"], "running_after": stats["running"]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def check(result: dict) -> None:
    total = result["requests"]
    assert total["failed"] == 0 and total["cut"] == 0, total
    assert result["started_and_answered_while_down"] >= 1, result  # the data plane served with the GCS gone
    assert result["kv_used_bytes_after"] == 0 and result["running_after"] == 0, result


def test_gcs_killed_under_load(cluster):
    result = run_scenario(cluster, "gcs-killed", cluster.kill_gcs, cluster.restart_gcs, outage_s=15)
    check(result)


def test_head_node_killed_under_load(cluster):
    def kill():
        assert cluster.kill_head() >= 3  # GCS, raylet, agents, the controller and the head's proxy
        # The worker's proxy still answers a new request with every head process gone.
        assert httpx.post(cluster.worker_url + "/v1/chat/completions", json=TEXT, timeout=60).status_code == 200

    result = run_scenario(cluster, "head-node-killed", kill, lambda _: cluster.start_head(), outage_s=20)
    check(result)

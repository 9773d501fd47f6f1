"""`python -m loadtests.autoscale_run`: the decoder pool's autoscaling on two Ray nodes. A headless locust run
saturates one DecoderPool replica (configs/local-2node.yaml: min 1, max 2, target_ongoing_requests 12); Serve
scales the pool to two replicas, the second on the other node (each node has one decoder slot), and back to one
after the load. Prints (and writes as JSON) the replica count and nodes over time, the locust totals and how many
requests each replica served (the KV-budget router's spread)."""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from loadtests.twonode import TwoNodes, replica_nodes

APP, POOL = "crosstrim", "DecoderPool"
ROOT = Path(__file__).resolve().parents[1]


def watch(url: str, t0: float, samples: list, stop: threading.Event, period_s: float = 2.0) -> None:
    """Every period: the pool's replica states, the nodes its live replicas run on, each replica's running
    sequences (/stats, the router's spread)."""
    from ray import serve

    http = httpx.Client(base_url=url, timeout=10)
    while not stop.is_set():
        try:
            states = serve.status().applications[APP].deployments[POOL].replica_states
            nodes = replica_nodes(APP, POOL)
            busy = [r["running"] for r in http.get("/stats").json()["decoder_replicas"]]
            samples.append({"t_s": round(time.monotonic() - t0, 1), "running": int(states.get("RUNNING", 0)),
                            "starting": int(states.get("STARTING", 0)) + int(states.get("PENDING_ALLOCATION", 0)),
                            "nodes": len(set(nodes)), "sequences_per_replica": busy})
        except Exception as exc:  # a status call racing a scale change: skip the sample
            samples.append({"t_s": round(time.monotonic() - t0, 1), "error": repr(exc)})
        stop.wait(period_s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.autoscale_run", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--load-s", type=int, default=90)
    p.add_argument("--cooldown-s", type=int, default=90, help="how long to watch for the scale-down")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", default="bench-results/autoscale")
    args = p.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    samples, stop = [], threading.Event()
    nodes = TwoNodes(head_decoder_slots=1, node_cpus=2)
    try:
        nodes.start()
        url = nodes.deploy()
        t0 = time.monotonic()
        watcher = threading.Thread(target=watch, args=(url, t0, samples, stop), daemon=True)
        watcher.start()
        time.sleep(6)  # the idle baseline
        locust = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
             "-u", str(args.users), "-r", str(args.users), "-t", f"{args.load_s}s", "--host", url,
             "--csv", str(out / "locust"), "--max-tokens", str(args.max_tokens), "--ignore-eos",
             "--image-mix", "1", "--only-summary"], capture_output=True, text=True)
        load_end = round(time.monotonic() - t0, 1)
        time.sleep(args.cooldown_s)
        stop.set()
        watcher.join()
        with httpx.Client(base_url=url, timeout=30) as http:
            per_replica = [s.get("tokens_generated") for s in http.get("/stats").json()["decoder_replicas"]]
    finally:
        stop.set()
        nodes.stop()
    totals = next(r for r in (out / "locust_stats.csv").read_text().splitlines() if ",Aggregated," in r)
    result = {"users": args.users, "load_s": args.load_s, "load_ended_at_s": load_end, "samples": samples,
              "locust_aggregated_csv_row": totals, "locust_exit_code": locust.returncode,
              "tokens_generated_per_live_replica_at_end": per_replica}
    (out / "autoscale.json").write_text(json.dumps(result, indent=2))
    print(locust.stdout[-2500:] or locust.stderr[-2500:])
    print(f"load from 6 s to {load_end} s; replicas over time (t_s: running+starting, nodes):")
    for s in samples:
        print(f"  {s['t_s']:>6}  running {s.get('running')}  starting {s.get('starting')}  nodes {s.get('nodes')}  "
              f"sequences per replica {s.get('sequences_per_replica')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

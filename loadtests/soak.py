"""Soak benchmark (issue 14): the Serve app of configs/local.yaml under locust for N minutes at ~80% of its
saturation throughput: failures, RSS growth per replica, KV back to 0 afterwards. Writes JSON and a BENCHMARKS.md
section. A benchmark, not a test:
  python -m loadtests.soak --minutes 10
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from deployments import localrun
from loadtests.bench_e2e.locust_runs import locust_summary, stop_process_group
from loadtests.bench_e2e.probe import replica_processes, serve_handle

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
APP = "crosstrim"
MARK = ("<!-- soak:begin -->", "<!-- soak:end -->")


def locust(url: str, prefix: Path, users: int, seconds: int, max_tokens: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{seconds}s", "--host", url, "--csv", str(prefix), "--only-summary", "--stop-timeout", "0",
           "--loglevel", "WARNING", "--image-mix", "1,2", "--max-tokens", str(max_tokens), "--ignore-eos"]
    with open(f"{prefix}.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def decoder_stats() -> dict:
    return serve_handle("DecoderPool", APP).stats.remote().result(timeout_s=30)


def tokens_per_s(url: str, workdir: Path, users: int, seconds: int, max_tokens: int, warmup_s: int) -> float:
    proc = locust(url, workdir / f"probe-{users}", users, seconds, max_tokens)
    try:
        time.sleep(warmup_s)
        a, t0 = decoder_stats()["tokens_generated"], time.monotonic()
        time.sleep(seconds - warmup_s - 2)
        return (decoder_stats()["tokens_generated"] - a) / (time.monotonic() - t0)
    finally:
        stop_process_group(proc)


def rss_mib() -> dict[str, float]:
    out = {}
    for name, p in replica_processes(APP).items():
        try:
            out[name] = round(p.memory_info().rss / 2**20, 1)
        except Exception:  # a replica restarting
            continue
    return out


def run(args) -> dict:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    localrun.start_ray(num_cpus=2)
    try:
        url = localrun.deploy(localrun.load_config(ROOT / "configs" / "local.yaml"), APP, timeout_s=300)
        probes = {u: round(tokens_per_s(url, workdir, u, args.probe_s, args.max_tokens, 8), 1) for u in args.probe_users}
        best = max(probes.values())
        users = min(u for u, tps in probes.items() if tps >= args.load * best)
        print(f"saturation probe tok/s by users {probes}; soaking at {users} users", flush=True)
        proc = locust(url, workdir / "soak", users, args.minutes * 60, args.max_tokens)
        t0, samples = time.monotonic(), []
        try:
            while proc.poll() is None:
                time.sleep(args.sample_s)
                samples.append({"t_s": round(time.monotonic() - t0), "rss_mib": rss_mib(), **{
                    k: v for k, v in decoder_stats().items() if k in ("running", "kv_used_bytes", "tokens_generated")}})
                print(samples[-1], flush=True)
        finally:
            stop_process_group(proc)
        deadline = time.monotonic() + 30
        while decoder_stats()["kv_used_bytes"] and time.monotonic() < deadline:
            time.sleep(0.5)
        after = decoder_stats()
        base = next(s for s in samples if s["t_s"] >= args.baseline_s)  # after warm-up: caches and allocators
        last = samples[-1]
        growth = {k: round(last["rss_mib"][k] - base["rss_mib"][k], 1) for k in last["rss_mib"] if k in base["rss_mib"]}
        return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "minutes": args.minutes, "users": users,
                "probe_tokens_per_s": probes, "load_of_saturation": round(probes[users] / best, 2),
                "max_tokens": args.max_tokens, "locust": locust_summary(workdir / "soak"),
                "tokens_per_s": round((last["tokens_generated"] - samples[0]["tokens_generated"])
                                      / max(last["t_s"] - samples[0]["t_s"], 1), 1),
                "rss_mib_at_baseline": base["rss_mib"], "rss_mib_at_end": last["rss_mib"],
                "rss_growth_mib": growth, "baseline_s": base["t_s"],
                "kv_used_bytes_after": after["kv_used_bytes"], "running_after": after["running"], "samples": samples}
    finally:
        localrun.stop()


def markdown(r: dict, command: str) -> str:
    loc = r["locust"]
    rows = "\n".join(f"| {k} | {r['rss_mib_at_baseline'][k]} | {r['rss_mib_at_end'][k]} | {v:+.1f} |"
                     for k, v in sorted(r["rss_growth_mib"].items()))
    return f"""{MARK[0]}
## Soak: {r['minutes']} minutes under steady load

`{command}` ({r['date']}): configs/local.yaml (tiny model) on a local Ray with 2 CPU cores shared with other work,
locust streaming chat requests (1- and 2-tile images, {r['max_tokens']} output tokens, ignore_eos). Saturation probe
(decoder tok/s by users): {r['probe_tokens_per_s']}; soak at {r['users']} users, the fewest whose probe reached 80% of the best
(it reached {r['load_of_saturation']:.0%}); {r['tokens_per_s']} tok/s over the soak
({r['tokens_per_s'] / max(r['probe_tokens_per_s'].values()):.0%} of the best probe: the machine is shared).

- requests: {loc['requests']}, failures: {loc['failures']}; TTFT p50 {loc['ttft_p50_ms']} ms, p99 {loc['ttft_p99_ms']} ms
- after the load: KV used {r['kv_used_bytes_after']} bytes, running {r['running_after']}

| replica | RSS MiB at {r['baseline_s']} s | RSS MiB at end | growth MiB |
|---|---|---|---|
{rows}
{MARK[1]}"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--probe-users", type=lambda s: [int(x) for x in s.split(",")], default="2,4,8,16")
    p.add_argument("--probe-s", type=int, default=25)
    p.add_argument("--load", type=float, default=0.8, help="soak at the fewest users reaching this share of the best")
    p.add_argument("--sample-s", type=int, default=15)
    p.add_argument("--baseline-s", type=int, default=60, help="RSS growth is measured from here (warm-up before)")
    p.add_argument("--workdir", default="bench-results/soak")
    p.add_argument("--json", dest="json_path", default="bench-results/soak.json")
    p.add_argument("--markdown", default="BENCHMARKS.md", help="'' to skip")
    args = p.parse_args()
    result = run(args)
    Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_path).write_text(json.dumps(result, indent=1))
    if args.markdown:
        section = markdown(result, "python -m loadtests.soak " + " ".join(sys.argv[1:]))
        path = Path(args.markdown)
        text = path.read_text()
        pattern = re.compile(re.escape(MARK[0]) + ".*?" + re.escape(MARK[1]), re.S)
        path.write_text(pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n"
                        + section + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`crosstrim bench e2e`: the Serve app of configs/bench.yaml (bench model, one KV budget) on a local Ray, driven
by locust at increasing user counts with trimming at the default policy and off, then HF generate on static batches
of the same requests in this process. Writes JSON, a table in BENCHMARKS.md and a plot."""

import csv
import importlib.util
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from deployments import localrun

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
PROMPT = "Describe this image."
TILES = 4  # every request carries one 4-tile image: 4,100 visual tokens on the bench model
SYSTEMS = {"trimmed": "default", "untrimmed": "off"}  # the locustfile's --trim
HF = "hf_generate"
MARKERS = ("<!-- e2e:start -->", "<!-- e2e:end -->")
TARGETS = {"trimmed_vs_untrimmed": 1.6, "trimmed_vs_hf_generate": 2.0}


def workload():
    """loadtests/workload.py (not a package; it must not drag locust's gevent patching into this process)."""
    spec = importlib.util.spec_from_file_location("crosstrim_workload", ROOT / "loadtests" / "workload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_args(bench):
    """`crosstrim bench e2e`'s arguments (the `crosstrim.bench` entry point); returns its runner."""
    e = bench.add_parser("e2e", help="the Serve app under locust, trimmed vs untrimmed, vs HF generate (bench model)")
    e.add_argument("--json", dest="json_path", default="bench-results/e2e.json")
    e.add_argument("--config", default=None, help="default: configs/bench.yaml of the repo")
    e.add_argument("--users", type=lambda s: [int(x) for x in s.split(",")], default="1,2,4,8,12,16,20,24",
                   help="locust user counts, increasing; a sweep stops once throughput stops improving")
    e.add_argument("--point-s", type=int, default=40, help="seconds of locust per point")
    e.add_argument("--warmup-s", type=int, default=12, help="rates are measured after this much of a point")
    e.add_argument("--max-tokens", type=int, default=64, help="output tokens of every request (ignore_eos)")
    e.add_argument("--saturation-gain", type=float, default=0.05,
                   help="saturated when two points running are not this much faster than the best before them")
    e.add_argument("--hf-repeats", type=int, default=2, help="static batches of each size HF generate runs")
    e.add_argument("--time-budget-s", type=float, default=840, help="the whole bench; points are skipped to meet it")
    e.add_argument("--hf-reserve-s", type=float, default=120, help="of the budget, kept for HF generate")
    e.add_argument("--markdown", default="BENCHMARKS.md", help="'' to skip; the section between e2e markers")
    e.add_argument("--plot", default="bench-results/e2e.png")
    e.add_argument("--plot-copy", default="docs/e2e.png", help="the copy BENCHMARKS.md links ('' for none)")
    e.add_argument("--workdir", default="bench-results/e2e-locust", help="locust's CSVs and logs")
    e.add_argument("--note", default=None, help="a paragraph for the report")
    e.add_argument("--from-json", default=None, help="re-render the report of an earlier run; no measuring")
    return run


# ------------------------------------------------------------------------------------------------ the Serve app

class Bench:
    """One deployed app and the measurements around its locust runs."""

    def __init__(self, url: str, app: str, args, workdir: Path):
        self.url, self.app, self.args, self.workdir = url, app, args, workdir
        self.http = httpx.Client(base_url=url, timeout=60)
        self.replicas = replica_processes(app)

    def stats(self) -> dict:
        r = self.http.get("/stats")
        r.raise_for_status()
        return r.json()["decoder"]

    def snapshot(self, locust_pid: int | None = None) -> dict:
        """Decoder counters, CPU seconds of every replica, of locust, of everything this bench started (Ray
        included), and of the whole machine (the difference is other people's work)."""
        cpu = {name: _cpu_seconds(p) for name, p in self.replicas.items()}
        if locust_pid is not None:
            cpu["locust"] = _cpu_seconds(psutil.Process(locust_pid), children=True)
        return {"time": time.time(), "decoder": self.stats(), "cpu": cpu,
                "ours": _cpu_seconds(psutil.Process(), children=True), "machine_busy": machine_busy()}

    def wait_idle(self, timeout_s: float = 90) -> None:
        """Until the last point's requests are gone: locust's stopped users disconnect and the engine aborts them,
        but an encoder or trimmer forward already under way runs to its end."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            s = self.stats()
            if s["running"] == 0 and s["waiting"] == 0 and self._stages_cpu_over(0.5) < 0.1:
                return
            time.sleep(0.5)
        raise TimeoutError(f"the app still has work {timeout_s}s after locust stopped: {self.stats()}")

    def _stages_cpu_over(self, seconds: float) -> float:
        """Cores the replicas used over the next `seconds`."""
        before = sum(_cpu_seconds(p) for p in self.replicas.values())
        time.sleep(seconds)
        return (sum(_cpu_seconds(p) for p in self.replicas.values()) - before) / seconds

    def warm_up(self, w) -> None:
        """First calls pay lazy initialisation in every replica; keep that out of the first point."""
        png = w.image_set(448, 1)[TILES][0]
        for trim in ("default", "off", "default"):
            body = w.chat_body(None, PROMPT, w.data_url(png), 4, w.trim_field(trim, None), ignore_eos=True)
            body["stream"] = False
            body.pop("stream_options")
            r = self.http.post("/v1/chat/completions", json=body, timeout=300)
            r.raise_for_status()

    def point(self, system: str, users: int) -> dict:
        """One locust run at `users`; rates over [warmup_s, point_s - 1] of it, latencies from locust."""
        args = self.args
        self.wait_idle()
        decoder = serve_handle("DecoderPool", self.app)
        decoder.reset_peaks.remote().result()
        prefix = self.workdir / f"{system}_u{users}"
        proc = start_locust(self.url, prefix, system, users, args)
        t0 = time.monotonic()
        try:
            time.sleep(max(0.0, t0 + args.warmup_s - time.monotonic()))
            a = self.snapshot(proc.pid)
            time.sleep(max(0.0, t0 + args.point_s - 1 - time.monotonic()))
            b = self.snapshot(proc.pid)
            proc.wait(timeout=args.point_s + 60)
        finally:
            stop_process_group(proc)
        point = {"system": system, "users": users, "locust_exit_code": proc.returncode,
                 **window_rates(a, b, history_counts(prefix, "chat/completions")),
                 **locust_summary(prefix), "peak_running": self.stats()["peak_running"]}
        print(_point_line(point), flush=True)
        return point


def replica_processes(app: str) -> dict:
    """deployment name -> psutil.Process of its replica, among this driver's descendants (our Ray only)."""
    found = {}
    tag = f"ServeReplica:{app}:"
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if tag in title:  # the title is "ray::ServeReplica:APP:DEPLOYMENT[.method]"
            found[title.split(tag, 1)[1].split(".")[0].split()[0]] = p
    return found


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every core, every process)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def _cpu_seconds(p: psutil.Process, children: bool = False) -> float:
    total = 0.0
    for q in [p, *(p.children(recursive=True) if children else [])]:
        try:
            t = q.cpu_times()
        except psutil.Error:  # a child that just exited
            continue
        total += t.user + t.system
    return total


def serve_handle(deployment: str, app: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app)


def start_locust(url: str, prefix: Path, system: str, users: int, args) -> subprocess.Popen:
    ramp_s = min(5.0, args.warmup_s / 2)  # staggered arrivals; stats reset once all users run
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
           "-r", f"{max(users / ramp_s, 1.0):.3f}", "-t", f"{args.point_s}s", "--host", url,
           "--csv", str(prefix), "--csv-full-history", "--only-summary", "--reset-stats", "--stop-timeout", "0",
           "--loglevel", "WARNING", "--trim", SYSTEMS[system], "--image-mix", str(TILES), "--tile-px", "448",
           "--prompt", PROMPT, "--max-tokens", str(args.max_tokens), "--ignore-eos"]
    with open(f"{prefix}.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def stop_process_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ------------------------------------------------------------------------------------------------ locust output

def history_counts(prefix: Path, name: str) -> list[tuple[int, int]]:
    """(unix second, requests completed since the stats reset) from locust's per-second history."""
    rows = []
    with open(f"{prefix}_stats_history.csv") as f:
        for row in csv.DictReader(f):
            if row["Name"] == name:
                rows.append((int(row["Timestamp"]), int(row["Total Request Count"])))
    return rows


def count_at(history: list[tuple[int, int]], t: float) -> tuple[int, int]:
    """The last history row at or before t (the first row if none)."""
    before = [row for row in history if row[0] <= t]
    return before[-1] if before else (history[0] if history else (int(t), 0))


def window_rates(a: dict, b: dict, history: list[tuple[int, int]]) -> dict:
    """Rates between two snapshots: output tokens/s and the decode batch from the decoder's counters, requests/s
    from locust's history, CPU cores used per process and per request."""
    dt = b["time"] - a["time"]
    da, db = a["decoder"], b["decoder"]
    (ta, ca), (tb, cb) = count_at(history, a["time"]), count_at(history, b["time"])
    requests = cb - ca  # completed in the window, by locust's clock
    steps, decode_steps = db["steps"] - da["steps"], db["decode_steps"] - da["decode_steps"]
    cores = {k: (b["cpu"][k] - a["cpu"][k]) / dt for k in b["cpu"] if k in a["cpu"]}
    rps = requests / (tb - ta) if tb > ta else 0.0
    return {
        "window_s": round(dt, 2),
        "requests_per_s": round(rps, 3),
        "output_tokens_per_s": round((db["tokens_generated"] - da["tokens_generated"]) / dt, 2),
        "mean_decode_batch": round((db["decode_rows"] - da["decode_rows"]) / decode_steps, 2) if decode_steps else 0,
        # The engine sleeps when idle, so its busy time per step is its CPU time (one torch thread) per step.
        "decoder_cpu_ms_per_step": round(cores["DecoderPool"] * dt * 1e3 / steps, 1)
        if steps and "DecoderPool" in cores else None,
        "cpu_cores": {k: round(v, 3) for k, v in cores.items()},
        "machine_busy_cores": round((b["machine_busy"] - a["machine_busy"]) / dt, 3),
        "other_cores": round(max(0.0, b["machine_busy"] - a["machine_busy"] - b["ours"] + a["ours"]) / dt, 3),
        "cpu_ms_per_request": {k: round(v / rps * 1e3, 1) for k, v in cores.items()} if rps else {},
    }


def locust_summary(prefix: Path) -> dict:
    """Latencies, failures and per-request KV from locust's stats CSV (everything since the stats reset)."""
    with open(f"{prefix}_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}

    def metric(name: str, column: str = "Average Response Time") -> float | None:
        row = rows.get(("METRIC", name))
        return float(row[column]) if row and int(row["Request Count"]) else None

    def mib(name: str) -> float | None:
        kib = metric(name)
        return round(kib / 1024, 2) if kib is not None else None

    chat = rows.get(("POST", "chat/completions"), {})
    return {
        "requests": int(chat.get("Request Count", 0)),
        "failures": sum(int(r["Failure Count"]) for (kind, name), r in rows.items()
                        if kind != "METRIC" and name != "Aggregated"),
        "ttft_p50_ms": metric("ttft_ms", "50%"), "ttft_p99_ms": metric("ttft_ms", "99%"),
        "itl_p50_ms": metric("itl_ms", "50%"),
        "output_tokens_per_request": metric("output_tokens"),
        "cross_kv_mib_per_request": mib("cross_kv_kib"), "shipped_mib_per_request": mib("shipped_kib"),
        "hop_ms_mean": round(metric("hop_ms"), 1) if metric("hop_ms") is not None else None,
    }


def _point_line(p: dict) -> str:
    return (f"  {p['system']:<11} users {p['users']:>3}: {p['output_tokens_per_s']:>7.1f} tok/s "
            f"{p['requests_per_s']:>6.2f} req/s  batch {p['mean_decode_batch']:>5}  TTFT p50/p99 "
            f"{p.get('ttft_p50_ms')}/{p.get('ttft_p99_ms')} ms  failures {p.get('failures')}")


def saturated(points: list[dict], gain: float, patience: int = 2) -> bool:
    """Output tokens/s stopped improving: each of the last `patience` points is not `gain` faster than the best
    before them (one slow point, say from a burst of other work on the machine, does not end a sweep)."""
    if len(points) < patience + 2:
        return False
    best_before = max(p["output_tokens_per_s"] for p in points[:-patience])
    return all(p["output_tokens_per_s"] < (1 + gain) * best_before for p in points[-patience:])


def sweep(bench: Bench, deadline: float) -> dict[str, list[dict]]:
    """Increasing user counts, the systems interleaved at each (drift in the machine hits both alike), each until
    its throughput stops improving or the time budget says stop."""
    args = bench.args
    points, active = {s: [] for s in SYSTEMS}, list(SYSTEMS)
    for users in args.users:
        for system in list(active):
            if time.monotonic() + args.point_s + 15 > deadline:
                print(f"  no time left for {system} at {users} users (time budget)", flush=True)
                return points
            points[system].append(bench.point(system, users))
            if saturated(points[system], args.saturation_gain):
                active.remove(system)  # more users only queue
        if not active:
            break
    return points


def run_serve_sweeps(config: dict, args, workdir: Path, deadline: float) -> dict:
    app = config["applications"][0]["name"]
    localrun.start_ray(num_cpus=2)
    try:
        t0 = time.monotonic()
        url = localrun.deploy(config, app, timeout_s=300)
        bench = Bench(url, app, args, workdir)
        bench.warm_up(workload())
        print(f"app up and warm in {time.monotonic() - t0:.0f}s at {url}", flush=True)
        return sweep(bench, deadline)
    finally:
        localrun.stop()


# ------------------------------------------------------------------------------------------------ HF generate

def kv_bytes_untrimmed(loaded, engine_cfg, prompt_tokens: int, max_tokens: int) -> int:
    """What the engine reserves for one untrimmed request (HF's cache holds the same K/V)."""
    from pipeline.engine.llm_engine import LLMEngine

    kv = LLMEngine(loaded, engine_cfg.model_copy(update={"kv_budget_bytes": 2**16})).kv
    visual = loaded.model.config.vision_config
    tokens = TILES * ((visual.image_size // visual.patch_size) ** 2 + 1)
    return kv.bytes_needed(prompt_tokens + max_tokens, tokens)


def hf_batch(loaded, pngs: list[bytes], max_tokens: int, deadline: float = float("inf")) -> dict:
    """HF generate on one static batch, timed from PNG bytes to the last token (as the app is timed); stopped
    early (and marked incomplete) past `deadline`, so a starved run cannot blow the time budget."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from pipeline.model.inputs import decode_image, prepare_prompt, user_message

    stamps = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())  # called once per generated token, after it is chosen
            late = time.monotonic() > deadline
            return torch.full((input_ids.shape[0],), late, dtype=torch.bool, device=input_ids.device)

    busy0, own0, t0 = machine_busy(), _cpu_seconds(psutil.Process()), time.perf_counter()
    prepared = [prepare_prompt(loaded.processor, user_message(PROMPT, 1), [decode_image(p)], 1, 4096) for p in pngs]
    inputs = {k: torch.cat([p.hf_inputs()[k] for p in prepared]) for k in prepared[0].hf_inputs()}
    with torch.inference_mode():
        loaded.model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                              stopping_criteria=StoppingCriteriaList([Clock()]))
    seconds = time.perf_counter() - t0
    other = max(0.0, machine_busy() - busy0 - (_cpu_seconds(psutil.Process()) - own0)) / seconds
    return {"seconds": seconds, "tokens": len(stamps) * len(pngs), "complete": len(stamps) == max_tokens,
            "ttft_ms": (stamps[0] - t0) * 1e3, "itl_ms": [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])],
            "prompt_tokens": len(prepared[0].input_ids), "other_cores": other}


def pick_threads(loaded, png: bytes) -> dict[int, float]:
    """ms per token of a short batch-1 generate at 1 and at all cores' torch threads. HF gets its better one: a
    process of 2 threads collapses (20x here) when anything else runs on a 2-core machine."""
    import torch

    ms = {}
    for threads in sorted({1, os.cpu_count()}):
        torch.set_num_threads(threads)
        hf_batch(loaded, [png], 2)
        ms[threads] = round(statistics.median(hf_batch(loaded, [png], 8)["itl_ms"]), 1)
    torch.set_num_threads(min(ms, key=ms.get))
    return ms


def run_hf(args, model_cfg, engine_cfg, deadline: float) -> tuple[list[dict], dict]:
    """HF generate, static batches of the same requests, every batch size up to what the KV budget holds."""
    import torch

    from pipeline.model.loader import load_model

    loaded = load_model(model_cfg)  # the preset's seed: the replicas' weights
    pngs = workload().image_set(448, 4)[TILES]
    itl_by_threads = pick_threads(loaded, pngs[0])
    prompt_tokens = hf_batch(loaded, pngs[:1], 2)["prompt_tokens"]
    need = kv_bytes_untrimmed(loaded, engine_cfg, prompt_tokens, args.max_tokens)
    max_batch = engine_cfg.kv_budget_bytes // need
    sizes = sorted({b for b in args.users if b <= max_batch} | {max_batch})
    info = {"torch_threads": torch.get_num_threads(), "itl_ms_batch1_by_threads": itl_by_threads,
            "kv_bytes_per_request": need, "max_batch": max_batch, "prompt_tokens": prompt_tokens}
    points = []
    for b in sizes:
        if time.monotonic() + 30 > deadline:
            print(f"  {HF}: no time left for batch {b} (time budget)", flush=True)
            break
        runs = [hf_batch(loaded, [pngs[i % len(pngs)] for i in range(b)], args.max_tokens, deadline)
                for _ in range(args.hf_repeats)]
        points.append(hf_point(b, runs, need))
        print(_point_line(points[-1]), flush=True)
    return points, info


def hf_point(batch: int, runs: list[dict], kv_bytes: int) -> dict:
    seconds, tokens = sum(r["seconds"] for r in runs), sum(r["tokens"] for r in runs)
    ttfts = [r["ttft_ms"] for r in runs]  # every row of a batch gets its first token at once
    return {"system": HF, "users": batch, "requests_per_s": round(batch * len(runs) / seconds, 3),
            "output_tokens_per_s": round(tokens / seconds, 2),
            "ttft_p50_ms": round(statistics.median(ttfts), 1), "ttft_p99_ms": round(max(ttfts), 1),
            "itl_p50_ms": round(statistics.median(x for r in runs for x in r["itl_ms"]), 1),
            "failures": 0, "mean_decode_batch": batch, "requests": batch * len(runs),
            "complete": all(r["complete"] for r in runs),
            "other_cores": round(max(r["other_cores"] for r in runs), 2),
            "cross_kv_mib_per_request": round(kv_bytes / 2**20, 2), "shipped_mib_per_request": None}


# ------------------------------------------------------------------------------------------------ the report

def summarize(sweeps: dict, hf_points: list[dict], hf_info: dict, meta: dict) -> dict:
    """Peak (saturation) points per system and the target ratios."""
    systems = {**sweeps, HF: hf_points}
    peak = {s: max(ps, key=lambda p: p["output_tokens_per_s"]) for s, ps in systems.items() if ps}
    tput = {s: p["output_tokens_per_s"] for s, p in peak.items()}
    ratios = {f"trimmed_vs_{other}": tput["trimmed"] / tput[other]
              for other in ("untrimmed", HF) if {"trimmed", other} <= tput.keys()}
    checks = {f"{k} >= {TARGETS[k]}": v >= TARGETS[k] for k, v in ratios.items()}
    if {"trimmed", "untrimmed"} <= peak.keys():
        checks["mean decode batch trimmed > untrimmed"] = (peak["trimmed"]["mean_decode_batch"]
                                                           > peak["untrimmed"]["mean_decode_batch"])
    checks["0 failures"] = all(p.get("failures", 0) == 0 for ps in systems.values() for p in ps)
    misses = [f"{k} is {v:.2f}x, {100 * (1 - v / TARGETS[k]):.0f}% short of {TARGETS[k]}x"
              for k, v in ratios.items() if v < TARGETS[k]]
    return {**meta, "hf": hf_info, "points": [p for ps in systems.values() for p in ps],
            "saturation": {s: {"users": p["users"], "output_tokens_per_s": p["output_tokens_per_s"],
                               "mean_decode_batch": p["mean_decode_batch"],
                               # a Serve sweep that ended still rising would have gone higher with more users
                               "saturated": s == HF or saturated(systems[s], meta.get("saturation_gain", 0.05))}
                           for s, p in peak.items()},
            "ratios": {k: round(v, 3) for k, v in ratios.items()}, "targets_met": checks, "misses": misses}


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(result: dict, plot_rel: str) -> str:
    m = result
    lines = [
        MARKERS[0],
        "## End to end: the Serve app under locust vs HF generate",
        "",
        *([m["note"], ""] if m.get("note") else []),
        *(["```bash", m["command"], "```", ""] if m.get("command") else []),
        f"`crosstrim bench e2e` ({m['date']}, {m['wall_s']:.0f} s): configs/bench.yaml on a local Ray with "
        f"{m['cpus']} CPU cores, bench model preset (random 142M mllama, one 4-tile image = 4,100 visual tokens "
        f"per request, fp32), streaming chat requests of exactly {m['max_tokens']} output tokens from locust "
        f"(closed loop: users = concurrent requests), {m['point_s']} s per point, rates over its last "
        f"{m['point_s'] - m['warmup_s'] - 1} s. One app and one KV budget ({m['kv_budget_bytes'] / 2**20:.0f} MiB) "
        f"for trimmed (the default policy, topk_union k_ratio 0.15) and untrimmed (`trim: {{enabled: false}}`) "
        f"requests; HF `generate` runs static batches of the same requests in one process (both cores), "
        f"batch sizes up to the {m['hf']['max_batch']} whose KV fits that budget, with "
        f"{m['hf']['torch_threads']} torch thread(s) (its faster setting here: batch-1 ms/token by threads "
        f"{m['hf']['itl_ms_batch1_by_threads']}; every replica of the app runs one). Other processes on the machine "
        f"used up to {max(p.get('other_cores', 0) for p in m['points']):.2f} cores during a measurement.",
        "",
        "| system | users | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | failures "
        "| mean decode batch | cross K/V held / request MiB | shipped / request MiB | other processes' cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in m["points"]:
        lines.append(f"| {p['system']} | {p['users']} | {_fmt(p['requests_per_s'], 2)} | "
                     f"{_fmt(p['output_tokens_per_s'])} | {_fmt(p['ttft_p50_ms'], 0)} | {_fmt(p['ttft_p99_ms'], 0)} | "
                     f"{_fmt(p['itl_p50_ms'], 0)} | {p['failures']} | {_fmt(p['mean_decode_batch'], 2)} | "
                     f"{_fmt(p['cross_kv_mib_per_request'])} | {_fmt(p['shipped_mib_per_request'])} | "
                     f"{_fmt(p.get('other_cores'), 2)} |")
    lines += ["", "At saturation (each system's best point): " + ", ".join(
        f"{s} {v['output_tokens_per_s']:.1f} tok/s at {v['users']} users (decode batch {v['mean_decode_batch']}"
        + ("" if v.get("saturated", True) else "; the sweep ended still rising") + ")"
        for s, v in m["saturation"].items()) + ".",
        "Ratios: " + ", ".join(f"{k} **{v:.2f}x** (target {TARGETS[k]}x)" for k, v in m["ratios"].items()) + ".",
        "Targets: " + ", ".join(f"{k}: {'met' if ok else '**missed**'}" for k, ok in m["targets_met"].items()) + "."]
    if m["misses"]:
        lines += ["Missed: " + "; ".join(m["misses"]) + "."]
    lines += profile_lines(m)
    lines += ["", f"![throughput and p99 TTFT against users]({plot_rel})", MARKERS[1]]
    return "\n".join(lines)


def profile_lines(m: dict) -> list[str]:
    """Where a request's time goes at each system's saturation point: CPU per request by replica."""
    rows = []
    for s in SYSTEMS:
        sat = m["saturation"].get(s)
        if not sat:
            continue
        p = next(p for p in m["points"] if p["system"] == s and p["users"] == sat["users"])
        cpu = p.get("cpu_ms_per_request", {})
        step = p.get("decoder_cpu_ms_per_step")
        per_row = step / p["mean_decode_batch"] if step and p["mean_decode_batch"] else None
        rows.append(f"| {s} | {_fmt(cpu.get('Ingress'), 0)} | {_fmt(cpu.get('VisionEncoder'), 0)} | "
                    f"{_fmt(cpu.get('Trimmer'), 0)} | {_fmt(cpu.get('DecoderPool'), 0)} | "
                    f"{_fmt(cpu.get('locust'), 0)} | "
                    f"{_fmt(p.get('hop_ms_mean'))} | {_fmt(step)} | {_fmt(per_row)} | "
                    f"{_fmt(p.get('machine_busy_cores'), 2)} | {_fmt(p.get('other_cores'), 2)} |")
    if not rows:
        return []
    return ["", "Profile at saturation: CPU ms per request by process over the window; the trimmer -> decoder hop "
                "as the decoder saw it; the decoder's CPU ms per engine step (prefills included) and per decoded row:",
            "", "| system | ingress | encoder | trimmer | decoder | locust | hop ms | decoder step ms | step ms / row "
            "| machine busy cores | other processes' cores |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows]


def write_markdown(path: Path, section: str) -> None:
    """Replace the e2e section between its markers; keep every other section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = MARKERS
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, style in (("trimmed", "o-"), ("untrimmed", "s-"), (HF, "^--")):
        ps = sorted((p for p in result["points"] if p["system"] == system), key=lambda p: p["users"])
        if not ps:
            continue
        users = [p["users"] for p in ps]
        tput.plot(users, [p["output_tokens_per_s"] for p in ps], style, label=system)
        ttft.plot(users, [p["ttft_p99_ms"] or float("nan") for p in ps], style, label=system)
    tput.set(xlabel="users (concurrent requests; HF: static batch size)", ylabel="output tokens/s",
             title="throughput")
    ttft.set(xlabel="users (concurrent requests; HF: static batch size)", ylabel="p99 TTFT (ms)",
             title="time to first token", yscale="log")
    for ax in (tput, ttft):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"crosstrim bench e2e: bench model, {result['max_tokens']} output tokens, "
                 f"KV budget {result['kv_budget_bytes'] / 2**20:.0f} MiB, {result['cpus']} CPU cores")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ the command

def _raise_on_sigterm() -> None:
    """A SIGTERM unwinds like Ctrl-C, so the finally blocks stop locust and Ray."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def run(args) -> int:
    if args.from_json:  # re-render the report of an earlier run (say, with a --note), measuring nothing
        result = json.loads(Path(args.from_json).read_text())
    else:
        result = measure(args)
    if args.note:
        result["note"] = args.note
    json_path, plot_path = Path(args.json_path), Path(args.plot)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    plot(result, plot_path)
    if args.plot_copy:
        Path(args.plot_copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot_path, args.plot_copy)
    if args.markdown:
        plot_rel = os.path.relpath(Path(args.plot_copy or plot_path).resolve(), Path(args.markdown).resolve().parent)
        write_markdown(Path(args.markdown), markdown(result, plot_rel))
    print(json.dumps({k: result[k] for k in ("saturation", "ratios", "targets_met", "wall_s")}, indent=2))
    print(f"wrote {json_path}, {plot_path}" + (f", {args.markdown}" if args.markdown else ""))
    return 0


def measure(args) -> dict:
    from pipeline.config import EngineConfig, ModelConfig

    _raise_on_sigterm()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average_at_start": os.getloadavg(),
            "command": shlex.join(["crosstrim", *sys.argv[1:]])}
    t0 = time.monotonic()
    config = localrun.load_config(args.config or ROOT / "configs" / "bench.yaml")
    app_args = config["applications"][0]["args"]
    model_cfg, engine_cfg = ModelConfig(**app_args["model"]), EngineConfig(**app_args["engine"])
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    print(f"load average {meta['load_average_at_start'][0]:.2f} (other work on the machine skews every number)",
          flush=True)
    sweeps = run_serve_sweeps(config, args, workdir, t0 + args.time_budget_s - args.hf_reserve_s)
    partial = Path(args.json_path).with_suffix(".serve.json")  # kept should HF generate fail
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text(json.dumps(sweeps, indent=2))
    hf_points, hf_info = run_hf(args, model_cfg, engine_cfg, t0 + args.time_budget_s)
    meta.update(cpus=os.cpu_count(), max_tokens=args.max_tokens, point_s=args.point_s, warmup_s=args.warmup_s,
                saturation_gain=args.saturation_gain,
                kv_budget_bytes=engine_cfg.kv_budget_bytes, trim=app_args["trim"], prompt=PROMPT,
                tiles_per_image=TILES, wall_s=round(time.monotonic() - t0, 1))
    return summarize(sweeps, hf_points, hf_info, meta)

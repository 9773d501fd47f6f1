"""`crosstrim bench e2e`: the Serve app of configs/bench.yaml (bench model, one KV budget) on a local Ray, driven
by locust at increasing user counts with trimming at the default policy and off, then HF generate on static batches
of the same requests in this process. Writes JSON, a table in BENCHMARKS.md and a plot."""

import json
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

from deployments import localrun
from loadtests.bench_e2e.constants import PROMPT, ROOT, SYSTEMS, TILES, workload
from loadtests.bench_e2e.hf_baseline import run_hf
from loadtests.bench_e2e.locust_runs import saturated
from loadtests.bench_e2e.probe import Bench
from loadtests.bench_e2e.report import markdown, plot, summarize, write_markdown


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


# ---------------------------------------------------------------------------------------------------- sweeps

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

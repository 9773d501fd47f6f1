"""Measure the step-cost model `crosstrim bench elastic` simulates its clock with (pipeline/bench/step_cost.py):
time the real engine's steps over a grid of prefill batches, decode batches and kept fractions, and fit
ms = base + per prompt row + per decoded row + per prompt row x tile's worth of kept visual tokens + per decoded
row x tile's worth of kept visual tokens, by least squares over the per-configuration least times.

    python scripts/calibrate_step_cost.py --model preset:bench --threads 1 --json bench-results/step-cost.json
    python scripts/calibrate_step_cost.py --pool A.json B.json --json C.json  # refit runs' least times together
"""

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.bench.step_cost import StepCost, tile_tokens
from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams


def requests(model: str, count: int, fractions: list[float], tiles: int):
    """The model and `count` image requests trimmed at each kept fraction (1.0: untrimmed)."""
    from pipeline.inprocess import Pipeline
    from pipeline.quality.synthetic import generate_samples, noise_image

    if model == "preset:bench":
        from pipeline.model.presets import build_bench_model

        loaded = build_bench_model(ModelConfig(source=model, dtype="float32", device="cpu"))
        size = loaded.model.config.vision_config.image_size
        pipe = Pipeline(loaded, engine=EngineConfig(kv_budget_bytes=2**20))
        prompts = [pipe.prepare("Describe the picture in detail, please.", [noise_image(tiles * size, tiles * size, i)])
                   for i in range(count)]
    else:
        pipe = Pipeline(ModelConfig(source=model, dtype="float32", device="cpu"), engine=EngineConfig(kv_budget_bytes=2**20))
        prompts = [pipe.prepare(s.prompt, [s.image]) for s in generate_samples(count, 777)]
    visuals = [pipe.encoder.encode(p) for p in prompts]
    trimmed = {f: [pipe.trimmer.trim(p, v, TrimConfig(policy="none") if f >= 1.0 else
                                     TrimConfig(policy="target", target_fraction=f)) for p, v in zip(prompts, visuals)]
               for f in fractions}
    return pipe.loaded, trimmed


def measure(loaded, trimmed: dict, batches: list[int], decode_steps: int, rounds: int) -> list[dict]:
    """Per (fraction, batch, step kind): the work of a step and its least wall time over rounds x steps (the
    machine is shared: the least is the step undisturbed)."""
    reqs = next(iter(trimmed.values()))
    budget = 4 * max(batches) * max(LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**30)).kv_bytes_for(
        r, SamplingParams(max_tokens=decode_steps + 2)) for r in trimmed[max(trimmed)])
    cfg = EngineConfig(kv_budget_bytes=budget, max_running=max(batches), max_waiting=max(batches), max_model_len=1024,
                       step_token_budget=max(batches) * max(r.prompt_len for r in reqs) + max(batches))
    engine = LLMEngine(loaded, cfg)
    params = SamplingParams(max_tokens=decode_steps + 1, ignore_eos=True)
    rows = []
    for f, reqs in trimmed.items():
        for b in batches:
            times: dict[str, list[float]] = {"prefill": [], "decode": []}
            work = {}
            for r in range(rounds + 1):  # round 0 warms up
                for req in reqs[:b]:
                    engine.add_request(req, params)
                for step in range(decode_steps + 1):
                    t0 = time.perf_counter()
                    engine.step_tokens()
                    ms = (time.perf_counter() - t0) * 1e3
                    kind = "prefill" if step == 0 else "decode"
                    work[kind] = engine.last_work
                    if r:
                        times[kind].append(ms)
                assert not engine.has_work()
            for kind, ts in times.items():
                w = work[kind]
                rows.append({"fraction": f, "batch": b, "kind": kind, **asdict(w), "ms": round(min(ts), 3)})
                print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="preset:bench")
    p.add_argument("--tiles", type=int, default=2, help="preset:bench: tiles x tiles tiles an image")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--fractions", default="0.25,0.5,1.0")
    p.add_argument("--decode-steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the measurements and the fit here")
    p.add_argument("--pool", nargs="+", metavar="JSON", help="no measuring: refit earlier runs (of one model) "
                   "together, each configuration at its least time over them")
    args = p.parse_args(argv)
    if args.pool:
        return pool(args.pool, args.json)
    torch.set_num_threads(args.threads)
    batches = [int(x) for x in args.batches.split(",")]
    loaded, trimmed = requests(args.model, max(batches), [float(x) for x in args.fractions.split(",")], args.tiles)
    image_tokens = tile_tokens(loaded)
    t0 = time.perf_counter()
    with torch.inference_mode():
        rows = measure(loaded, trimmed, batches, args.decode_steps, args.rounds)
    cost, r2 = StepCost.fit(rows, image_tokens)
    out = {"model": args.model, "threads": args.threads, "tile_tokens": image_tokens, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": round(time.perf_counter() - t0, 1),
           "fit": cost.as_dict(), "r2": round(r2, 4), "rows": rows}
    print(json.dumps({k: out[k] for k in ("fit", "r2", "tile_tokens", "wall_s")}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def pool(paths: list[str], json_path: str | None) -> int:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    assert len({r["model"] for r in runs}) == 1, "runs of one model"
    least: dict[tuple, dict] = {}
    for row in (row for r in runs for row in r["rows"]):
        key = (row["fraction"], row["batch"], row["kind"])
        least[key] = min(least.get(key, row), row, key=lambda x: x["ms"])
    rows = list(least.values())
    cost, r2 = StepCost.fit(rows, runs[0]["tile_tokens"])
    out = {**{k: runs[0][k] for k in ("model", "threads", "tile_tokens", "torch")}, "pooled": paths,
           "fit": cost.as_dict(), "r2": round(r2, 4), "rows": rows}
    print(json.dumps({k: out[k] for k in ("fit", "r2", "tile_tokens")}))
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

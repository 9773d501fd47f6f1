"""`crosstrim bench pipeline`: the three stages in process (encode -> trim -> decode) on one workload, trimmed
and untrimmed: end-to-end and engine-only tokens/s, the most sequences running at once, seconds per stage and KV
bytes per request. Prints a table and writes JSON. `--baseline-tree DIR` runs the same workload again on another
checkout (a `git worktree` of an older commit) in a subprocess, and reports the ratios side by side.

Written against the API every tree since the engine renovation has (Pipeline, its encoder and trimmer,
LLMEngine.add_request / step / has_work / stats), so this one file runs on an older tree too; it uses the stages'
batched calls (`VisionEncoder.encode_batch`, `Trimmer.trim_batch`) where the tree has them, else calls each stage
once a request.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline import inprocess
from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.inprocess import Pipeline
from pipeline.model.inputs import prepare_prompt, user_message
from pipeline.orchestration import trimmer_input
from pipeline.quality.synthetic import noise_image

PROMPT = "Describe the picture in detail, please."  # the bench prompt (pipeline/bench/sources.py)
MODES = ("trimmed", "untrimmed")


def add_pipeline_args(bench) -> None:
    p = bench.add_parser("pipeline", help="encoder -> trimmer -> decoder in process on one workload")
    add_options(p)


def add_options(p) -> None:
    p.add_argument("--json", dest="json_path", default="bench-results/pipeline.json")
    p.add_argument("--model", default="preset:bench")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--distinct", type=int, default=8, help="distinct noise images, cycled over the requests")
    p.add_argument("--image-size", type=int, default=448, help="each image is size x size pixels")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--kv-budget", type=int, default=2**30, help="KV bytes (paged)")
    p.add_argument("--max-running", type=int, default=256, help="high enough that the KV budget is the limit")
    p.add_argument("--stage-batch", type=int, default=8, help="prompts per call of a batched stage")
    p.add_argument("--k-ratio", type=float, default=None, help="trimmed: default the TrimConfig default policy")
    p.add_argument("--modes", default=",".join(MODES), help="trimmed,untrimmed or one of them")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline-tree", default=None, help="also run the workload on this checkout; ratios")
    p.add_argument("--repeats", type=int, default=1, help="runs of each mode on each tree; each side's best counts")


def _workload(pipe, args) -> list:
    """The prepared prompts: one noise image each, `distinct` pictures cycled."""
    images = [noise_image(args.image_size, args.image_size, i) for i in range(min(args.distinct, args.requests))]
    prepared = [prepare_prompt(pipe.loaded.processor, user_message(PROMPT, 1), [img], 1, 4096) for img in images]
    return [prepared[i % len(prepared)] for i in range(args.requests)]


def _chunks(xs: list, size: int) -> list[list]:
    return [xs[i : i + size] for i in range(0, len(xs), size)]


def _stages(pipe, prepared: list, trim, batch: int) -> tuple[list, dict]:
    """Encode then trim every prompt, each stage timed over the whole workload: (decode requests, seconds)."""
    encoder, trimmer = pipe.encoder, pipe.trimmer
    batched = hasattr(encoder, "encode_batch") and hasattr(trimmer, "trim_batch")
    requests, encode_s, trim_s = [], 0.0, 0.0
    for part in _chunks(prepared, batch if batched else 1):  # a chunk's features are freed once trimmed
        t0 = time.perf_counter()
        visual = encoder.encode_batch(part) if batched else [encoder.encode(p) for p in part]
        t1 = time.perf_counter()
        inputs = [trimmer_input(p) for p in part]
        requests += (trimmer.trim_batch(inputs, visual, [trim] * len(part)) if batched
                     else [trimmer.trim(x, v, trim) for x, v in zip(inputs, visual)])
        encode_s, trim_s = encode_s + t1 - t0, trim_s + time.perf_counter() - t1
    return requests, {"encode": encode_s, "trim": trim_s, "stages_batched": batched}


def _decode(loaded, requests: list, args) -> dict:
    """Every request into one engine at once, stepped until done; only the steps are timed."""
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=args.kv_budget, max_running=args.max_running,
                                            max_waiting=max(256, len(requests)), max_model_len=4096))
    kv_per_request = sum(engine.kv_bytes_for(r, params) for r in requests) / len(requests)
    seqs = [engine.add_request(r, params) for r in requests]
    seconds, steps, max_running = 0.0, 0, 0
    while engine.has_work():
        t0 = time.perf_counter()
        engine.step()
        seconds += time.perf_counter() - t0
        steps += 1
        max_running = max(max_running, engine.stats().running)
    stats = engine.stats()
    return {"engine": seconds, "tokens": sum(len(s.output_ids) for s in seqs), "steps": steps,
            "max_running": max_running, "preemptions": stats.preemptions, "kv_bytes_per_request": kv_per_request,
            "kv_budget_bytes": stats.kv_budget_bytes}


def run_tree(args) -> dict:
    """The workload on the tree this process imports `pipeline` from: one result per mode."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = Pipeline(ModelConfig(source=args.model, dtype=args.dtype, device="cpu"),
                    engine=EngineConfig(kv_budget_bytes=2**20))  # its own engine unused: each mode builds one
    prepared = _workload(pipe, args)
    trims = {"trimmed": TrimConfig() if args.k_ratio is None else TrimConfig(k_ratio=args.k_ratio),
             "untrimmed": TrimConfig(policy="none")}
    results = {}
    for mode in args.modes.split(","):
        requests, stage = _stages(pipe, prepared, trims[mode], args.stage_batch)
        kept = sum(r.num_kept for r in requests) / len(requests)
        decode = _decode(pipe.loaded, requests, args)
        del requests
        total = stage["encode"] + stage["trim"] + decode["engine"]
        results[mode] = {
            "tokens": decode["tokens"], "requests": args.requests,
            "tokens_per_s_end_to_end": round(decode["tokens"] / total, 2),
            "tokens_per_s_engine": round(decode["tokens"] / decode["engine"], 2),
            "max_running": decode["max_running"],
            "seconds": {"encode": round(stage["encode"], 3), "trim": round(stage["trim"], 3),
                        "prefill_decode": round(decode["engine"], 3), "total": round(total, 3)},
            "kv_bytes_per_request": round(decode["kv_bytes_per_request"]),
            "kept_visual_tokens_per_request": round(kept, 1),
            "steps": decode["steps"], "preemptions": decode["preemptions"],
            "stages_batched": stage["stages_batched"],
        }
    return {"tree": str(Path(inprocess.__file__).resolve().parents[1]),  # which checkout ran
            "model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "max_tokens": args.max_tokens, "kv_budget_bytes": args.kv_budget, "image_size": args.image_size,
            "distinct_images": min(args.distinct, args.requests), "modes": results}


def _forward_options(args) -> list[str]:
    """This run's workload options, for the baseline's subprocess."""
    opts = ["--model", args.model, "--dtype", args.dtype, "--requests", args.requests, "--distinct", args.distinct,
            "--image-size", args.image_size, "--max-tokens", args.max_tokens, "--kv-budget", args.kv_budget,
            "--max-running", args.max_running, "--stage-batch", args.stage_batch, "--modes", args.modes,
            "--threads", args.threads]
    if args.k_ratio is not None:
        opts += ["--k-ratio", args.k_ratio]
    return [str(o) for o in opts]


def run_baseline(args) -> dict:
    """The same workload on `args.baseline_tree`: this file run by a Python whose `pipeline` is that tree's."""
    tree = Path(args.baseline_tree).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baseline.json"
        # runpy from a `-c` program: sys.path[0] is the working directory (the tree), not this file's folder
        code = (f"import runpy, sys; sys.argv = ['bench-pipeline', *sys.argv[1:]]; "
                f"runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')")
        env = dict(os.environ, PYTHONPATH=str(tree))
        subprocess.run([sys.executable, "-c", code, *_forward_options(args), "--tree-only", str(out)],
                       cwd=tree, env=env, check=True)
        return json.loads(out.read_text())


def compare(current: dict, baseline: dict) -> dict:
    """Per mode, this tree's rate over the baseline's (same workload, same run)."""
    out = {}
    for mode, cur in current["modes"].items():
        base = baseline["modes"][mode]
        out[mode] = {k: round(cur[k] / base[k], 3) for k in ("tokens_per_s_end_to_end", "tokens_per_s_engine")}
        out[mode]["seconds"] = {k: round(base["seconds"][k] / cur["seconds"][k], 3) if cur["seconds"][k] else None
                                for k in cur["seconds"]}  # speed-up of each stage
    return out


def print_table(result: dict) -> None:
    trees = [("this tree", result["current"])] + ([("baseline", result["baseline"])] if "baseline" in result else [])
    head = f'{"tree":<10} {"mode":<10} {"e2e tok/s":>10} {"engine tok/s":>13} {"max run":>8} {"encode s":>9} ' \
           f'{"trim s":>8} {"decode s":>9} {"KV MiB/req":>11}'
    print(head)
    for name, tree in trees:
        for mode, r in tree["modes"].items():
            s = r["seconds"]
            print(f'{name:<10} {mode:<10} {r["tokens_per_s_end_to_end"]:>10} {r["tokens_per_s_engine"]:>13} '
                  f'{r["max_running"]:>8} {s["encode"]:>9} {s["trim"]:>8} {s["prefill_decode"]:>9} '
                  f'{r["kv_bytes_per_request"] / 2**20:>11.2f}')
    for mode, ratio in result.get("ratio_vs_baseline", {}).items():
        print(f'{mode}: end-to-end x{ratio["tokens_per_s_end_to_end"]}, engine x{ratio["tokens_per_s_engine"]} '
              f'the baseline; stage speed-ups {ratio["seconds"]}')


def _merged(runs: list[dict]) -> dict:
    """One tree's per-mode runs as one result: per mode the run with the best end-to-end rate (best of repeats)."""
    modes = {}
    for run in runs:
        for m, r in run["modes"].items():
            if m not in modes or r["tokens_per_s_end_to_end"] > modes[m]["tokens_per_s_end_to_end"]:
                modes[m] = r
    return runs[0] | {"modes": modes, "repeats": len(runs) // len(modes)}


def run(args) -> int:
    """Mode by mode, this tree then the baseline, `repeats` times: on a shared machine the two sides of a ratio run
    as close together in time as they can, and each side's best run is the least disturbed one."""
    current, baseline = [], []
    for _ in range(args.repeats):
        for mode in args.modes.split(","):
            one = argparse.Namespace(**(vars(args) | {"modes": mode}))
            current.append(run_tree(one))
            if args.baseline_tree:
                baseline.append(run_baseline(one))
    result = {"current": _merged(current)}
    if args.baseline_tree:
        result["baseline"] = _merged(baseline)
        result["baseline_tree"] = str(Path(args.baseline_tree).resolve())
        result["ratio_vs_baseline"] = compare(result["current"], result["baseline"])
    print_table(result)
    from pipeline.bench.sources import write_json  # here, not at the top: a baseline tree may not have it

    write_json(args.json_path, result)
    return 0


def main() -> None:
    """The baseline's entry point (and `python -m pipeline.bench.pipeline`)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(p)
    p.add_argument("--tree-only", default=None, help=argparse.SUPPRESS)  # a baseline run: this tree's JSON only
    args = p.parse_args()
    if args.tree_only:
        Path(args.tree_only).write_text(json.dumps(run_tree(args)))
    else:
        sys.exit(run(args))


if __name__ == "__main__":
    main()

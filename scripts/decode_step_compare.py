"""Decode-step time at fixed batch sizes, for side-by-side runs of source trees (uses only the engine's public API).
One tree: `PYTHONPATH=TREE python scripts/decode_step_compare.py --model tiny` prints one JSON line. Several trees in
one run: `python scripts/decode_step_compare.py --trees NEW,OLD --rounds 3 --json OUT` runs this script under each
tree in turn, round after round (the machine is shared: interleaving spreads its noise over both), and writes each
tree's per-batch medians over the rounds and the ratios NEW / OLD."""

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch


def measure(args) -> dict:
    from pipeline.config import EngineConfig, TrimConfig
    from pipeline.engine.llm_engine import LLMEngine
    from pipeline.engine.sampling import SamplingParams
    from pipeline.inprocess import Pipeline
    from pipeline.model.inputs import prepare_prompt, user_message
    from pipeline.model.presets import build_bench_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.model == "bench":
        loaded = build_bench_model()
        pipe = Pipeline(loaded, engine=EngineConfig(kv_budget_bytes=2**20))
    else:
        pipe = Pipeline(engine=EngineConfig(kv_budget_bytes=2**20))
        loaded = pipe.loaded
    size = loaded.model.config.vision_config.image_size
    img = __import__("PIL.Image").Image.fromarray(
        torch.randint(0, 255, (2 * size, 2 * size, 3), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8).numpy())
    prepared = prepare_prompt(loaded.processor, user_message("Describe the picture in detail, please.", 1), [img], 1, 4096)
    trim = pipe.trimmer.trim(prepared, pipe.encoder.encode(prepared), TrimConfig(k_ratio=args.k_ratio))
    result = {}
    for b in [int(x) for x in args.batches.split(",")]:
        engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**30, max_running=256, max_model_len=4096))
        for _ in range(b):
            engine.add_request(trim, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
        steps = []
        while engine.has_work():
            engine.step()
            st = engine.stats()
            if st.last_batch_size == b:
                steps.append(st.last_step_ms)
        result[f"step_ms_batch{b}_median"] = round(statistics.median(steps), 3)
        result[f"step_ms_batch{b}_mean"] = round(statistics.mean(steps), 3)
        result[f"step_ms_batch{b}_p10"] = round(statistics.quantiles(steps, n=10)[0], 3)  # robust to a busy box
    return result


def compare(args) -> dict:
    """Each tree's medians over rounds, interleaved, and the first tree over each other one."""
    trees = args.trees.split(",")
    runs = {t: [] for t in trees}
    own = ["--model", args.model, "--batches", args.batches, "--max-tokens", str(args.max_tokens),
           "--k-ratio", str(args.k_ratio)]
    for _ in range(args.rounds):
        for tree in trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            out = subprocess.run([sys.executable, __file__, *own], env=env, check=True, capture_output=True,
                                 text=True, cwd=os.path.abspath(tree)).stdout
            runs[tree].append(json.loads(out.strip().splitlines()[-1]))
            print(tree, runs[tree][-1], flush=True)
    med = {t: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]} for t, rs in runs.items()}
    new = trees[0]
    report = {"model": args.model, "batches": args.batches, "max_tokens": args.max_tokens, "rounds": args.rounds,
              "medians": med, "runs": runs}
    batches = [int(x) for x in args.batches.split(",")]
    for t in trees:
        m = med[t]
        report.setdefault("batch_over_batch1", {})[t] = {
            b: round(m[f"step_ms_batch{b}_median"] / m[f"step_ms_batch{batches[0]}_median"], 2) for b in batches}
    for old in trees[1:]:
        report.setdefault("new_over_old", {})[old] = {
            b: round(med[new][f"step_ms_batch{b}_median"] / med[old][f"step_ms_batch{b}_median"], 3) for b in batches}
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["bench", "tiny"], default="bench")
    ap.add_argument("--batches", default="1,12")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--k-ratio", type=float, default=0.08)
    ap.add_argument("--trees", help="comma-separated source trees: run each in turn, report NEW(first) / others")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.trees:
        report = compare(args)
        print(json.dumps({k: report[k] for k in report if k != "runs"}))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    else:
        print(json.dumps(measure(args)))


if __name__ == "__main__":
    main()

"""Prefill benchmarks. A long prompt admitted into running streams: the streams' inter-token gaps (median, p99,
max) and the long prompt's time to first token, chunked prefill (a per-step token budget) vs the whole prompt in
one step, in one run. The prefill's attention layout on CPU: one SDPA per chunk vs one block-diagonal SDPA over
every chunk's keys. With `--baseline-tree` (a `git worktree` of an older commit): the first step of an idle engine
given image and text-only prompts at once, this tree (one batched forward) vs that tree, alternated in
subprocesses. Prints tables and writes JSON.

    python -m pipeline.bench.prefill --threads 1 --json bench-results/prefill.json [--baseline-tree DIR]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.config import EngineConfig, ModelConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.model.layers import attend
from pipeline.model.loader import load_model
from pipeline.types import DecodeRequest

WHOLE = 1 << 30  # a step budget no prompt reaches: each prompt prefilled in one step (chunking off)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, nearest rank (no interpolation: a p99 of 100 gaps is the largest but one)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run_mode(loaded, args, budget: int) -> dict:
    """Streams decoding, `--before` steps timed, the long prompt added, stepped to its first token and
    `--after` steps more; every stream's gaps between consecutive tokens in that window (and in the steps before
    the long prompt arrived alone: the decode-only step)."""
    gen = torch.Generator().manual_seed(args.seed)
    vocab = loaded.model.lm_head.out_features
    engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=args.kv_mib * 2**20, max_running=args.streams + 1,
                                            max_model_len=args.prompt_tokens + 256, step_token_budget=budget))
    stream_params = SamplingParams(max_tokens=250, ignore_eos=True)
    streams = [engine.add_request(DecodeRequest(torch.randint(0, vocab, (args.stream_prompt,), generator=gen).tolist()),
                                  stream_params) for _ in range(args.streams)]
    while any(not s.output_ids for s in streams):
        engine.step()
    # Each stream's token times: wall clock, and this process's CPU time (the engine's own work, what the steps
    # cost without the other processes of a shared machine; torch runs one thread here).
    stamps = {id(s): [] for s in streams}

    def step():
        engine.step()
        now = (time.perf_counter(), time.process_time())
        for s in streams:
            if len(stamps[id(s)]) < len(s.output_ids):
                stamps[id(s)].append(now)

    for _ in range(args.before):
        step()
    long_ids = torch.randint(0, vocab, (args.prompt_tokens,), generator=gen).tolist()
    t0 = time.perf_counter()
    long = engine.add_request(DecodeRequest(long_ids), SamplingParams(max_tokens=8, ignore_eos=True))
    prefill_steps = 0
    while not long.output_ids:
        step()
        prefill_steps += 1
    ttft = time.perf_counter() - t0
    for _ in range(args.after):
        step()
    assert all(not s.finished for s in streams), "streams must outlast the window (raise max_tokens)"
    out = {"step_token_budget": budget if budget != WHOLE else "whole prompt", "long_prompt_steps": prefill_steps,
           "long_prompt_ttft_s": round(ttft, 3)}
    for clock, name in ((0, "wall"), (1, "cpu")):
        pairs = [(a[clock], b[clock], b[0]) for times in stamps.values() for a, b in zip(times, times[1:])]
        gaps = [(b - a) * 1e3 for a, b, _ in pairs]
        before = [(b - a) * 1e3 for a, b, wall in pairs if wall <= t0]
        median, median_before, p99 = statistics.median(gaps), statistics.median(before), percentile(gaps, 99)
        out |= {f"{name}_median_gap_ms": round(median, 2), f"{name}_p99_gap_ms": round(p99, 2),
                f"{name}_max_gap_ms": round(max(gaps), 2), f"{name}_p99_over_median": round(p99 / median, 3),
                f"{name}_median_gap_before_ms": round(median_before, 2),
                f"{name}_p99_over_median_before": round(p99 / median_before, 3)}
    out["gaps"] = len(gaps)
    return out


def long_prompt(loaded, args) -> dict:
    """Each chunked budget, then the whole prompt in one step."""
    runs = {f"budget {b}": run_mode(loaded, args, b) for b in args.budgets}
    runs["whole"] = run_mode(loaded, args, WHOLE)
    whole_ttft = runs["whole"]["long_prompt_ttft_s"]
    for r in runs.values():
        r["ttft_over_whole"] = round(r["long_prompt_ttft_s"] / whole_ttft, 3)
    print(f"{args.streams} streams, a {args.prompt_tokens}-token prompt admitted ({args.model}, {args.threads} thread)")
    print(f"{'':24}" + "".join(f"{name:>16}" for name in runs))
    for k in runs["whole"]:
        print(f"{k:24}" + "".join(f"{r[k]!s:>16}" for r in runs.values()))
    return {"streams": args.streams, "prompt_tokens": args.prompt_tokens, "runs": runs,
            "p99_over_median_target": 2.0}


# (rows of each chunk, keys it attends: its earlier chunks' and its own)
ATTENTION_MIXES = {"4 prompts x 128": ([128] * 4, [128] * 4),
                   "8 chunks x 32, histories to 2000": ([32] * 8, [32, 64, 128, 256, 512, 1024, 1536, 2000]),
                   "a 64-row chunk at 2000 + 3 short": ([64, 1, 1, 1], [2000, 40, 40, 40])}


def attention_layouts(heads: int, kv_heads: int, head_dim: int, repeats: int = 7) -> dict:
    """Median ms of a layer's prefill attention, per chunk vs one block-diagonal call, for each mix."""
    out = {}
    for name, (rows, keys) in ATTENTION_MIXES.items():
        qs = [torch.randn(1, heads, n, head_dim) for n in rows]
        ks = [torch.randn(1, kv_heads, t, head_dim) for t in keys]
        vs = [torch.randn(1, kv_heads, t, head_dim) for t in keys]
        masks = [torch.arange(t - n, t)[:, None] >= torch.arange(t)[None] for n, t in zip(rows, keys)]
        block = torch.zeros(sum(rows), sum(keys), dtype=torch.bool)
        a = b = 0
        for n, t, m in zip(rows, keys, masks):
            block[a : a + n, b : b + t] = m
            a, b = a + n, b + t
        q, k, v = torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2)
        chunks = list(zip(qs, ks, vs, masks))
        layouts = {"per_chunk": lambda chunks=chunks: [attend(*x, 0.1, mask=m) for *x, m in chunks],
                   "block_diagonal": lambda qkv=(q, k, v), block=block: attend(*qkv, 0.1, mask=block)}
        ms = {}
        for layout, fn in layouts.items():
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            ms[layout] = round(statistics.median(times), 3)
        out[name] = {**ms, "block_diagonal_over_per_chunk": round(ms["block_diagonal"] / ms["per_chunk"], 2)}
    return out


# Runs in either tree (only APIs both have): the bench model, `k` one-tile image requests (default trim) and `k`
# text-only prompts of `text_len` tokens added to an idle engine; its first step's ms (every prompt prefilled and
# its first token sampled), median of `repeats` fresh engines. Prints JSON.
FIRST_STEP = """
import json, statistics, sys, time, torch
torch.set_num_threads(1)
from pipeline.config import EngineConfig, ModelConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.inprocess import Pipeline
from pipeline.model.inputs import prepare_prompt, user_message
from pipeline.model.presets import build_bench_model
from pipeline.quality.synthetic import noise_image
from pipeline.types import DecodeRequest
k, text_len, repeats = map(int, sys.argv[1:4])
torch.manual_seed(0)
loaded = build_bench_model(ModelConfig(source="preset:bench", device="cpu", dtype="float32"))
pipe = Pipeline(loaded, engine=EngineConfig(kv_budget_bytes=2**20))
size = loaded.model.config.vision_config.image_size
message = user_message("Describe the picture in detail, please.", 1)
requests = [pipe.trim(prepare_prompt(loaded.processor, message, [noise_image(size, size, i)], 1, 4096))
            for i in range(k)]
vocab = loaded.model.lm_head.out_features
requests += [DecodeRequest(torch.randint(0, vocab, (text_len,)).tolist()) for _ in range(k)]
whole = {"step_token_budget": 1 << 30} if "step_token_budget" in EngineConfig.model_fields else {}
times = []
for _ in range(repeats):
    engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**30, **whole))
    for r in requests:
        engine.add_request(r, SamplingParams(max_tokens=2, ignore_eos=True))
    t0 = time.perf_counter()
    engine.step()
    times.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"first_step_ms": statistics.median(times), "rows": sum(r.prompt_len for r in requests)}))
"""


def first_step(tree: Path, k: int, text_len: int, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", FIRST_STEP, str(k), str(text_len), str(repeats)], cwd=tree, env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def batched_vs_baseline(baseline: Path, k: int, text_len: int, rounds: int = 3) -> dict:
    """Median first-step ms of each tree over `rounds` alternated subprocess runs."""
    here = Path(__file__).resolve().parents[2]
    ms = {"this_tree": [], "baseline": []}
    for _ in range(rounds):
        for name, tree in (("this_tree", here), ("baseline", baseline)):
            ms[name].append(first_step(tree, k, text_len, 3)["first_step_ms"])
    this, base = statistics.median(ms["this_tree"]), statistics.median(ms["baseline"])
    return {"image_prompts": k, "text_prompts": k, "text_len": text_len, "this_tree_ms": round(this, 1),
            "baseline_ms": round(base, 1), "baseline_over_this": round(base / this, 3), "baseline_tree": str(baseline)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="preset:bench", help="a model source (preset:bench, bundled:tiny-mllama, ...)")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--stream-prompt", type=int, default=16, help="tokens in each stream's prompt")
    p.add_argument("--prompt-tokens", type=int, default=2000, help="the long prompt's tokens")
    p.add_argument("--budgets", type=lambda v: [int(x) for x in v.split(",")], default=[48, 64, 96],
                   help="the chunked runs' step_token_budget values, comma-separated")
    p.add_argument("--before", type=int, default=20, help="timed steps before the long prompt arrives")
    p.add_argument("--after", type=int, default=20, help="timed steps after its first token")
    p.add_argument("--kv-mib", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-tree", default=None, help="an older tree: its first step vs this tree's")
    p.add_argument("--batched-k", type=int, default=8, help="image prompts, and text-only prompts, in that step")
    p.add_argument("--skip-long", action="store_true", help="only the attention layouts (and the baseline)")
    p.add_argument("--json", dest="json_path", default="bench-results/prefill.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(ModelConfig(source=args.model, device="cpu", dtype="float32"))
    tc = loaded.text_config
    attention = attention_layouts(tc.num_attention_heads, tc.num_key_value_heads,
                                  tc.hidden_size // tc.num_attention_heads)
    result = {"model": args.model, "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
              "attention_ms": attention}
    if not args.skip_long:
        result |= long_prompt(loaded, args)
    if args.baseline_tree:
        result["batched_first_step"] = batched = batched_vs_baseline(Path(args.baseline_tree), args.batched_k, 64)
        print(f"first step, {args.batched_k} image + {args.batched_k} text-only prompts of 64 tokens (ms): "
              f"this tree {batched['this_tree_ms']}, baseline {batched['baseline_ms']}, "
              f"baseline / this {batched['baseline_over_this']}")
    print("prefill attention, one layer (ms): per chunk vs one block-diagonal SDPA")
    for name, r in attention.items():
        print(f"  {name:36}{r['per_chunk']:>10}{r['block_diagonal']:>10}  x{r['block_diagonal_over_per_chunk']}")
    path = Path(args.json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

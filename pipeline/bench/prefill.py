"""Prefill benchmarks. A long prompt admitted into running streams: the streams' inter-token gaps (median, p99,
max) and the long prompt's time to first token, chunked prefill (a per-step token budget) vs the whole prompt in
one step, in one run. And the prefill's attention layout on CPU: one SDPA per chunk vs one block-diagonal SDPA over
every chunk's keys. Prints tables and writes JSON.

    python -m pipeline.bench.prefill --threads 1 --json bench-results/prefill.json
"""

import argparse
import json
import statistics
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
    stamps = {id(s): [] for s in streams}  # each stream's token times

    def step():
        engine.step()
        now = time.perf_counter()
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
    gaps = [(b - a) * 1e3 for times in stamps.values() for a, b in zip(times, times[1:])]
    before = [(b - a) * 1e3 for times in stamps.values() for a, b in zip(times, times[1:]) if b <= t0]
    median, median_before, p99 = statistics.median(gaps), statistics.median(before), percentile(gaps, 99)
    return {"step_token_budget": budget if budget != WHOLE else "whole prompt", "gaps": len(gaps),
            "median_gap_ms": round(median, 2), "p99_gap_ms": round(p99, 2), "max_gap_ms": round(max(gaps), 2),
            "p99_over_median": round(p99 / median, 3), "median_gap_before_ms": round(median_before, 2),
            "p99_over_median_before": round(p99 / median_before, 3), "long_prompt_steps": prefill_steps,
            "long_prompt_ttft_s": round(ttft, 3)}


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
    p.add_argument("--json", dest="json_path", default="bench-results/prefill.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(ModelConfig(source=args.model, device="cpu", dtype="float32"))
    tc = loaded.text_config
    attention = attention_layouts(tc.num_attention_heads, tc.num_key_value_heads,
                                  tc.hidden_size // tc.num_attention_heads)
    runs = {f"budget {b}": run_mode(loaded, args, b) for b in args.budgets}
    runs["whole"] = run_mode(loaded, args, WHOLE)
    whole_ttft = runs["whole"]["long_prompt_ttft_s"]
    for r in runs.values():
        r["ttft_over_whole"] = round(r["long_prompt_ttft_s"] / whole_ttft, 3)
    result = {"model": args.model, "streams": args.streams, "prompt_tokens": args.prompt_tokens,
              "threads": args.threads, "date": time.strftime("%Y-%m-%d"), "runs": runs, "attention_ms": attention,
              "p99_over_median_target": 2.0}
    print(f"{args.streams} streams, a {args.prompt_tokens}-token prompt admitted ({args.model}, {args.threads} thread)")
    print(f"{'':24}" + "".join(f"{name:>16}" for name in runs))
    for k in runs["whole"]:
        print(f"{k:24}" + "".join(f"{r[k]!s:>16}" for r in runs.values()))
    print("prefill attention, one layer (ms): per chunk vs one block-diagonal SDPA")
    for name, r in attention.items():
        print(f"  {name:36}{r['per_chunk']:>10}{r['block_diagonal']:>10}  x{r['block_diagonal_over_per_chunk']}")
    path = Path(args.json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

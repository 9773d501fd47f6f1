"""Micro-benchmark of the batched sampler: milliseconds a step (prepare + the pass + the one host read) at batch
1/32/64/128 over Llama 3.2's vocabulary, for greedy, filtered sampling and every field at once; optionally the
per-row `sample()` of an older tree (`--baseline-tree`, a `git worktree` of it) side by side. Prints and writes JSON.

    python -m pipeline.bench.sampler --json bench-results/sampler.json [--baseline-tree /path/to/old/tree]
"""

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from pipeline.engine.sampler import Sampler, SampleRow
from pipeline.engine.sampling import SamplingParams

LLAMA_VOCAB = 128256
CONFIGS = {
    "greedy": {},
    "sampled": {"temperature": 0.8, "top_p": 0.9, "top_k": 50},
    "all_fields": {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "min_p": 0.02, "presence_penalty": 0.5,
                   "frequency_penalty": 0.5, "repetition_penalty": 1.1, "logit_bias": {11: 2.0, 99: -5.0},
                   "max_tokens": 256, "min_tokens": 200, "stop_token_ids": [7], "logprobs": True, "top_logprobs": 5},
}


def _time(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _baseline_sample(tree: Path):
    spec = importlib.util.spec_from_file_location("baseline_sampling", tree / "pipeline/engine/sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args) -> dict:
    torch.manual_seed(0)
    vocab, prompt_len, output_len = args.vocab, 512, 128
    sampler = Sampler(vocab, "cpu", [128001, 128009])
    baseline = _baseline_sample(Path(args.baseline_tree)) if args.baseline_tree else None
    results = []
    for name, fields in CONFIGS.items():
        for b in args.batches:
            logits = torch.randn(b, vocab) * 4
            params = [SamplingParams(**fields, seed=i if i % 2 else None) for i in range(b)]
            prompts = [torch.randint(0, vocab, (prompt_len,)).tolist() for _ in range(b)]
            outputs = [torch.randint(0, vocab, (output_len,)).tolist() for _ in range(b)]
            rows = [SampleRow(p, p.seed, pr, out) for p, pr, out in zip(params, prompts, outputs)]
            ms = _time(lambda rows=rows, logits=logits: sampler.sample(logits, sampler.prepare(rows)), args.repeats)
            entry = {"config": name, "batch": b, "batched_ms": round(ms, 3), "batched_us_per_row": round(ms * 1e3 / b, 1)}
            if baseline is not None and name != "all_fields":  # the old sampler had no penalties
                old = [baseline.SamplingParams(**fields) for _ in range(b)]
                gens = [baseline.make_generator(p, "cpu") for p in old]

                def per_row(logits=logits, old=old, gens=gens):
                    return [baseline.sample(row, p, g) for row, p, g in zip(logits, old, gens)]

                entry["per_row_ms"] = round(_time(per_row, args.repeats), 3)
                entry["speedup"] = round(entry["per_row_ms"] / ms, 2)
            results.append(entry)
            print(json.dumps(entry), flush=True)
    return {"vocab": vocab, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "prompt_tokens": prompt_len, "output_tokens": output_len, "results": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", dest="json_path", default="bench-results/sampler.json")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 64, 128])
    p.add_argument("--vocab", type=int, default=LLAMA_VOCAB)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline-tree", default=None, help="a tree whose pipeline/engine/sampling.py has sample()")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = run(args)
    Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_path).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json_path}")


if __name__ == "__main__":
    main()

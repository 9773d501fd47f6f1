"""Measures the CPU decode-attention rule (attention.py PADDED_ELEMS): one self-attention layer's time, the padded
batched call vs the per-sequence loop, over batch sizes and history lengths, at the tiny and the bench model's
head layouts. `python scripts/attention_rule.py --json bench-results/attention-rule.json` (1 thread)."""

import argparse
import json
import time

import torch

from pipeline.engine.attention import CpuAttention
from pipeline.engine.kv_cache import KVCache
from pipeline.engine.step_batch import build_decode_batch

LAYOUTS = {"tiny": (4, 2, 16), "bench": (8, 4, 128)}  # heads, KV heads, head dim


def layer_ms(attn: CpuAttention, batch, q, layers: int, repeats: int) -> float:
    """One layer's time, the step's prepare spread over `layers` layers."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        step = attn.prepare(batch)
        for kv_layer in range(layers):
            attn.self_attn(q, step, kv_layer % attn.kv.num_self, q.shape[-1] ** -0.5)
        best = min(best, (time.perf_counter() - t0) * 1e3 / layers)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4,16,64,128")
    ap.add_argument("--lengths", default="16,64,256,1024")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, (heads, kvh, hd) in LAYOUTS.items():
        for b in [int(x) for x in args.batches.split(",")]:
            for n in [int(x) for x in args.lengths.split(",")]:
                budget = 2 * 2 * b * (n + 16) * kvh * hd * 4 + 2**20
                kv = KVCache(budget, 2, [], kvh, hd, torch.float32, "cpu", block_size=16)
                tables = [kv.allocate(n, 0) for _ in range(b)]
                batch = build_decode_batch([0] * b, [n] * b, tables, [None] * b, "cpu")
                q = torch.randn(b, heads, 1, hd)
                loop = layer_ms(CpuAttention(kv, padded_elems=0), batch, q, 8, args.repeats)
                padded = layer_ms(CpuAttention(kv, padded_elems=10**12), batch, q, 8, args.repeats)
                rows.append(dict(layout=name, batch=b, length=n, rows=b * n, loop_ms=round(loop, 4),
                                 padded_ms=round(padded, 4), padded_over_loop=round(padded / loop, 3)))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""`python -m loadtests.hop_nodes`: the trimmer -> decoder hand-off across two Ray nodes against within one node:
bytes and ms (p50/p99) per request, ship kv against features, trimmed against untrimmed, at the bench model's and
Llama-3.2-11B-Vision's shapes (synthetic tensors; the nodes are loadtests.twonode's two loopback nodes)."""

import argparse
import json
import statistics

from loadtests.measure_hop import LLAMA_11B, HopReceiver, HopSender, hops
from loadtests.twonode import DECODER, FRONTEND, TwoNodes

# preset:bench (pipeline/model/presets.py): 4 of 12 layers cross-attend, 4 KV heads, one 4-tile 448 px image, fp32.
BENCH = dict(hidden=1024, kv_heads=4, head_dim=128, layers=12, cross_layers=4, first_cross=2, visual=4100)
# The union over heads of each head's top 15% keeps ~46% of the image's tokens (the e2e bench's 31 MiB request).
KEPT_FRACTION = 0.46
MODELS = {"bench (fp32)": (BENCH, "float32"), "11B (bf16)": (LLAMA_11B, "bfloat16")}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def measure(n: int, prompt: int = 64, prefix: int = 5) -> list[dict]:
    import ray

    sender_on_a = ray.remote(num_cpus=0, resources={FRONTEND: 1})(HopSender)  # the trimmer's side: node A
    receiver = ray.remote(num_cpus=0)(HopReceiver)  # the decoder's side: node A (one node) or node B (two)
    receivers = {"one node": receiver.options(resources={FRONTEND: 1}).remote(),
                 "two nodes": receiver.options(resources={DECODER: 1}).remote()}
    rows = []
    for model, (m, dtype) in MODELS.items():
        for trim, kept in (("trimmed", round(KEPT_FRACTION * m["visual"])), ("untrimmed", m["visual"])):
            for ship in ("kv", "features"):
                sender = sender_on_a.remote(kept, prompt, prefix, dtype, ship, m)
                for where, rcv in receivers.items():
                    times = hops(sender, rcv, n)
                    ms = [h for h, _ in times]
                    rows.append({"model": model, "trim": trim, "ship": ship, "placement": where,
                                 "kept_tokens": kept, "bytes": times[0][1], "p50_ms": statistics.median(ms),
                                 "p99_ms": percentile(ms, 0.99)})
                ray.kill(sender)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.hop_nodes", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    with TwoNodes(object_store_mb=1024):
        rows = measure(args.requests)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print("| model | trim | ship | kept / visual | MiB | one node p50 / p99 ms | two nodes p50 / p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for one, two in zip(rows[::2], rows[1::2]):
        visual = (BENCH if one["model"].startswith("bench") else LLAMA_11B)["visual"]
        print(f"| {one['model']} | {one['trim']} | {one['ship']} | {one['kept_tokens']} / {visual} | "
              f"{one['bytes'] / 2**20:.1f} | {one['p50_ms']:.1f} / {one['p99_ms']:.1f} | "
              f"{two['p50_ms']:.1f} / {two['p99_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Batched encode and trim: seconds a request for the VisionEncoder and the Trimmer at each batch size, on the bench
model with 448x448 noise images (8 distinct, cycled) and the bench prompt; the batch sizes run back to back on
each group of requests (a shared machine drifts; the paired ratios are what to read); each batch
size's kept tokens checked equal to the first's.

    python -m pipeline.bench.stages --requests 32 --batches 1 8 --threads 1 --json bench-results/stages.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pipeline.bench.sources import PROMPT
from pipeline.config import ModelConfig, TrimConfig
from pipeline.model.encoder import VisionEncoder
from pipeline.model.inputs import prepare_prompt, user_message
from pipeline.model.presets import build_bench_model
from pipeline.model.trimmer import Trimmer
from pipeline.orchestration import trimmer_input
from pipeline.quality.synthetic import noise_image


def sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def run_group(encoder: VisionEncoder, trimmer: Trimmer, group: list, batch: int) -> tuple[float, float, list]:
    """The group's requests once, `batch` at a time: (encode s, trim s, kept positions per request)."""
    encode_s = trim_s = 0.0
    kept = []
    for i in range(0, len(group), batch):
        chunk = group[i : i + batch]
        t0 = time.perf_counter()
        visuals = encoder.encode_batch(chunk)
        sync(visuals[-1].features)
        t1 = time.perf_counter()
        requests = trimmer.trim_batch([trimmer_input(p) for p in chunk], visuals)
        sync(requests[-1].resume.hidden)
        t2 = time.perf_counter()
        encode_s, trim_s = encode_s + t1 - t0, trim_s + t2 - t1
        kept += [r.image.kept_positions.tolist() for r in requests]
    return encode_s, trim_s, kept


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    loaded = build_bench_model(ModelConfig(source="preset:bench", dtype=args.dtype, device=args.device))
    encoder, trimmer = VisionEncoder(loaded, args.images_per_forward), Trimmer(loaded, TrimConfig())
    images = [noise_image(args.size, args.size, i) for i in range(8)]
    prepared = [prepare_prompt(loaded.processor, user_message(PROMPT, 1), [images[i % 8]], 1, 4096)
                for i in range(args.requests)]
    size = max(args.batches)
    groups = [prepared[i : i + size] for i in range(0, len(prepared), size)]
    run_group(encoder, trimmer, groups[0], size)  # warm up
    # Each group of max(batches) requests runs at every batch size back to back: pairs a few seconds apart see the
    # same machine, so their ratio is what to read on a shared one.
    times: dict[int, list[tuple[float, float]]] = {b: [] for b in args.batches}
    kept: dict[int, list] = {b: [] for b in args.batches}
    for r in range(args.rounds):
        for group in groups:
            for b in args.batches:
                encode_s, trim_s, group_kept = run_group(encoder, trimmer, group, b)
                times[b].append((encode_s / len(group), trim_s / len(group)))
                if r == 0:
                    kept[b] += group_kept
    first = args.batches[0]
    rows = []
    for b in args.batches:
        assert kept[b] == kept[first], f"batch {b} kept other tokens than batch {first}"
        pairs = list(zip(times[first], times[b]))
        rows.append({
            "batch": b,
            "encode_s_per_request": round(statistics.median(t[0] for t in times[b]), 4),
            "trim_s_per_request": round(statistics.median(t[1] for t in times[b]), 4),
            "encode_trim_s_per_request": round(statistics.median(sum(t) for t in times[b]), 4),
            # the median over groups of (batch `first`'s seconds / this batch's), each pair run back to back
            "speedup_encode": round(statistics.median(a[0] / t[0] for a, t in pairs), 3),
            "speedup_trim": round(statistics.median(a[1] / t[1] for a, t in pairs), 3),
            "speedup_encode_trim": round(statistics.median(sum(a) / sum(t) for a, t in pairs), 3),
            "groups": [[round(e, 4), round(t, 4)] for e, t in times[b]],
        })
    return {"model": "preset:bench", "dtype": args.dtype, "device": args.device, "threads": args.threads,
            "images_per_forward": encoder.images_per_forward, "requests": args.requests, "rounds": args.rounds,
            "image": f"{args.size}x{args.size}", "prompt_tokens": len(prepared[0].input_ids),
            "visual_tokens_per_request": int(encoder.encode(prepared[0]).token_valid.sum()),
            "kept_equal_across_batches": True, "results": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=448, help="image side in pixels")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images-per-forward", type=int, help="the encoder's stacking bound (default: its own)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    out = run(args)
    for row in out["results"]:
        print(f"batch {row['batch']:3d}: encode {row['encode_s_per_request']:.4f} s  trim {row['trim_s_per_request']:.4f}"
              f" s  encode+trim {row['encode_trim_s_per_request']:.4f} s a request; vs batch {args.batches[0]}, paired: "
              f"encode {row['speedup_encode']:.2f}x trim {row['speedup_trim']:.2f}x both {row['speedup_encode_trim']:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""`crosstrim` command line: generate (one request in process), bench, batch, eval."""

import argparse
import importlib
import json
import sys
import time

from pydantic import ValidationError

from pipeline.errors import CrosstrimError


def _generate_args(sub) -> None:
    p = sub.add_parser("generate", help="run one request through encoder -> trimmer -> decoder in this process")
    p.add_argument("--model", default="bundled:tiny-mllama-vqa",
                   help="local dir, s3://bucket/prefix, hub id, bundled:NAME (default: the trained demo model)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    trim = p.add_mutually_exclusive_group()
    trim.add_argument("--k-ratio", type=float, help="Trimmed-Llama: per head keep ceil(k_ratio * tokens)")
    trim.add_argument("--no-trim", action="store_true", help="keep every visual token")
    p.add_argument("--policy", choices=["topk_union", "target", "budget", "mass"], default="topk_union")
    p.add_argument("--target-fraction", type=float, help="policy target: keep exactly this fraction of each image")
    p.add_argument("--kv-budget", type=int, help="KV budget in bytes (default: sized for this request)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_generate(args) -> int:
    from pipeline.config import EngineConfig, ModelConfig, TrimConfig
    from pipeline.engine.sampling import SamplingParams
    from pipeline.inprocess import Pipeline
    from pipeline.model.inputs import read_image_file

    fields = {} if args.target_fraction is None else {"policy": "target", "target_fraction": args.target_fraction}
    trim = TrimConfig(policy="none") if args.no_trim else TrimConfig(**{"policy": args.policy, **fields})
    if args.k_ratio is not None:
        trim = TrimConfig(policy="topk_union", k_ratio=args.k_ratio)  # pydantic checks 0 < k_ratio <= 1
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    images = [read_image_file(path) for path in args.image]
    t0 = time.perf_counter()
    engine = EngineConfig(kv_budget_bytes=args.kv_budget) if args.kv_budget else None
    pipe = Pipeline(ModelConfig(source=args.model, dtype=args.dtype), trim, engine, fit_kv=args.kv_budget is None)
    t_load = time.perf_counter()
    out = pipe.generate(args.prompt, images, params)
    t_gen = time.perf_counter()
    if args.json:
        result = out.as_dict() | {"load_s": round(t_load - t0, 3), "generate_s": round(t_gen - t_load, 3)}
        print(json.dumps(result))
    else:
        print(out.text)
        if out.visual_tokens:
            print(f"[kept {out.kept_tokens}/{out.visual_tokens} visual tokens; cross-attention KV "
                  f"{out.cross_kv_bytes} of {out.cross_kv_bytes_full} bytes]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crosstrim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_args(sub)
    commands = {"generate": cmd_generate}
    for name, module in (("bench", "bench.decoder"), ("batch", "batch.job"), ("eval", "quality.evaluate")):
        mod = importlib.import_module(f"pipeline.{module}")  # a broken subcommand fails loudly, never hides
        mod.add_args(sub)
        commands[name] = mod.run
    args = parser.parse_args(argv)
    try:
        return commands[args.command](args)
    except (CrosstrimError, ValidationError) as exc:  # what the user can fix: bad input, bad k_ratio, bad source
        print(f"crosstrim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

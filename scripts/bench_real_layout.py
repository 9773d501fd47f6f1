"""Per-stage load time, peak memory and time per request on a real-layout checkpoint (scripts/build_real_layout.py),
each stage in its own process loading only its weights, as a Serve replica does. Prints and writes JSON.

Run: python scripts/bench_real_layout.py CKPT [--dtype bfloat16 float32] [--threads 2] [--out bench-real.json]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_stage(ckpt: str, stage: str, dtype: str, threads: int) -> dict:
    """In this (child) process: load `stage`'s weights, then time one 4-tile request through it."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import image

    from pipeline.config import EngineConfig, ModelConfig, TrimConfig
    from pipeline.engine.llm_engine import LLMEngine
    from pipeline.engine.sampling import SamplingParams
    from pipeline.model.encoder import VisionEncoder
    from pipeline.model.inputs import prepare_prompt, user_message
    from pipeline.model.loader import load_model
    from pipeline.model.trimmer import Trimmer
    from pipeline.types import VisualFeatures

    torch.set_num_threads(threads)
    parts = {"encoder": ("vision",), "trimmer": ("trim",), "decoder": ("text",)}[stage]
    loaded = load_model(ModelConfig(source=ckpt, dtype=dtype, device="cpu"), parts=parts)
    after_load = loaded.load_stats()
    prompt = prepare_prompt(loaded.processor, user_message("Describe this image.", 1), [image(1120, 1120, 2)], 1, 4096)
    tc, tiles = loaded.text_config, prompt.cross_attention_mask.shape[-1]
    vc = loaded.model.config.vision_config
    per_tile = (vc.image_size // vc.patch_size) ** 2 + 1  # 1,601 at 560 px
    visual = VisualFeatures(torch.randn(1, tiles * per_tile, tc.hidden_size, dtype=loaded.dtype),
                            prompt.token_valid(per_tile))
    t0 = time.perf_counter()
    if stage == "encoder":
        VisionEncoder(loaded).encode(prompt)
        timings = {"encode_s": time.perf_counter() - t0}
    else:
        trim = Trimmer(loaded, TrimConfig(policy="target", target_fraction=0.5)).trim(prompt, visual)
        timings = {"trim_s": time.perf_counter() - t0, "kept_tokens": trim.image.kept_tokens[0]}
        if stage == "decoder":  # the decoder holds every weight the trimmer runs: its DecodeRequest is made here
            engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**29))
            t1 = time.perf_counter()
            (seq,) = engine.generate([trim], SamplingParams(max_tokens=16, ignore_eos=True))
            timings = {"decode_s": time.perf_counter() - t1, "tokens": len(seq.output_ids)}
    return {"stage": stage, "dtype": dtype, **after_load, **{k: round(v, 3) if isinstance(v, float) else v
                                                             for k, v in timings.items()},
            "peak_rss_after_request": loaded.load_stats()["peak_rss_bytes"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--dtype", nargs="+", default=["bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench-real.json"))
    p.add_argument("--stage", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    if args.stage:
        print(json.dumps(run_stage(args.ckpt, args.stage, args.dtype[0], args.threads)))
        return 0
    rows = []
    for dtype in args.dtype:
        for stage in ("encoder", "trimmer", "decoder"):
            out = subprocess.run([sys.executable, __file__, args.ckpt, "--stage", stage, "--dtype", dtype,
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{dtype:9} {stage:8} loaded {r['loaded_bytes'] / 2**30:6.2f} GiB in {r['load_s']:5.1f} s; "
                  f"peak RSS {r['peak_rss_after_request'] / 2**30:6.2f} GiB; "
                  + ", ".join(f"{k} {v}" for k, v in r.items() if k.endswith("_s") and k != "load_s"
                              or k in ("kept_tokens", "tokens")), flush=True)
    args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

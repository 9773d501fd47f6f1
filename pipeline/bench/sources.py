"""The bench model's requests for `crosstrim bench decoder`: distinct noise images, prepared, encoded and
trimmed (by the policy and untrimmed) with each stage timed; and HF generate's inputs for a static batch."""

import json
import time
from pathlib import Path

import torch

from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.model.inputs import prepare_prompt, user_message
from pipeline.quality.synthetic import noise_image

PROMPT = "Describe the picture in detail, please."


def prepare_sources(args, tiles: int):
    """The bench model and min(requests, 8) distinct image requests of tiles x tiles tiles, trimmed by the
    policy and untrimmed, with the encoder's and trimmer's times."""
    from pipeline.inprocess import Pipeline
    from pipeline.model.presets import build_bench_model

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = build_bench_model(ModelConfig(source="preset:bench", device=args.device, dtype=args.dtype))
    pipe = Pipeline(loaded, engine=EngineConfig(kv_budget_bytes=2**20))
    trim_cfg = TrimConfig() if args.k_ratio is None else TrimConfig(k_ratio=args.k_ratio)
    size = loaded.model.config.vision_config.image_size
    images = [noise_image(tiles * size, tiles * size, i) for i in range(min(args.requests, 8))]  # tiles x tiles
    prepared = [prepare_prompt(loaded.processor, user_message(PROMPT, 1), [img], 1, 4096) for img in images]
    stage_ms = {"encoder": [], "trimmer_trimmed": [], "trimmer_untrimmed": []}
    trimmed, untrimmed = [], []
    for p in prepared:
        t0 = time.perf_counter()
        visual = pipe.encoder.encode(p)
        t1 = time.perf_counter()
        trimmed.append(pipe.trimmer.trim(p, visual, trim_cfg))
        t2 = time.perf_counter()
        untrimmed.append(pipe.trimmer.trim(p, visual, TrimConfig(policy="none")))
        t3 = time.perf_counter()
        stage_ms["encoder"].append((t1 - t0) * 1e3)
        stage_ms["trimmer_trimmed"].append((t2 - t1) * 1e3)
        stage_ms["trimmer_untrimmed"].append((t3 - t2) * 1e3)
    return loaded, prepared, trimmed, untrimmed, stage_ms, trim_cfg


def hf_batch(loaded, prepared_list) -> dict:
    """HF generate's inputs for a static batch of prompts, on the model's device (floats in its dtype)."""
    batch = {k: torch.cat([p.hf_inputs()[k] for p in prepared_list]) for k in prepared_list[0].hf_inputs()}
    return {k: v.to(loaded.device, loaded.dtype) if v.is_floating_point() else v.to(loaded.device)
            for k, v in batch.items()}


def write_json(path: str, result: dict) -> None:
    """A bench's result as JSON at `path` (its folder made), and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")

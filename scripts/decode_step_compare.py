"""Decode-step time at fixed batch sizes on the bench model, for side-by-side runs of two source trees:
`PYTHONPATH=TREE python scripts/decode_step_compare.py` prints one JSON line (uses only the engine's public API)."""

import argparse
import json
import statistics

import torch

from pipeline.config import EngineConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.inprocess import Pipeline
from pipeline.model.inputs import prepare_prompt, user_message
from pipeline.model.presets import build_bench_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,12")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--k-ratio", type=float, default=0.08)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    loaded = build_bench_model()
    pipe = Pipeline(loaded, engine=EngineConfig(kv_budget_bytes=2**20))
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""The HF generate baseline: static batches of the same requests in this process, at the same KV budget."""

import os
import statistics
import time

import psutil

from loadtests.bench_e2e.constants import HF, PROMPT, TILES, workload
from loadtests.bench_e2e.locust_runs import _point_line
from loadtests.bench_e2e.probe import _cpu_seconds, machine_busy


def kv_bytes_untrimmed(loaded, engine_cfg, prompt_tokens: int, max_tokens: int) -> int:
    """What the engine reserves for one untrimmed request (HF's cache holds the same K/V)."""
    from pipeline.engine.llm_engine import LLMEngine

    kv = LLMEngine(loaded, engine_cfg.model_copy(update={"kv_budget_bytes": 2**16})).kv
    visual = loaded.model.config.vision_config
    tokens = TILES * ((visual.image_size // visual.patch_size) ** 2 + 1)
    return kv.bytes_needed(prompt_tokens + max_tokens, tokens)


def hf_batch(loaded, pngs: list[bytes], max_tokens: int, deadline: float = float("inf")) -> dict:
    """HF generate on one static batch, timed from PNG bytes to the last token (as the app is timed); stopped
    early (and marked incomplete) past `deadline`, so a starved run cannot blow the time budget."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from pipeline.model.inputs import decode_image, prepare_prompt, user_message

    stamps = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())  # called once per generated token, after it is chosen
            late = time.monotonic() > deadline
            return torch.full((input_ids.shape[0],), late, dtype=torch.bool, device=input_ids.device)

    busy0, own0, t0 = machine_busy(), _cpu_seconds(psutil.Process()), time.perf_counter()
    prepared = [prepare_prompt(loaded.processor, user_message(PROMPT, 1), [decode_image(p)], 1, 4096) for p in pngs]
    inputs = {k: torch.cat([p.hf_inputs()[k] for p in prepared]) for k in prepared[0].hf_inputs()}
    with torch.inference_mode():
        loaded.model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                              stopping_criteria=StoppingCriteriaList([Clock()]))
    seconds = time.perf_counter() - t0
    other = max(0.0, machine_busy() - busy0 - (_cpu_seconds(psutil.Process()) - own0)) / seconds
    return {"seconds": seconds, "tokens": len(stamps) * len(pngs), "complete": len(stamps) == max_tokens,
            "ttft_ms": (stamps[0] - t0) * 1e3, "itl_ms": [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])],
            "prompt_tokens": len(prepared[0].input_ids), "other_cores": other}


def pick_threads(loaded, png: bytes) -> dict[int, float]:
    """ms per token of a short batch-1 generate at 1 and at all cores' torch threads. HF gets its better one: a
    process of 2 threads collapses (20x here) when anything else runs on a 2-core machine."""
    import torch

    ms = {}
    for threads in sorted({1, os.cpu_count()}):
        torch.set_num_threads(threads)
        hf_batch(loaded, [png], 2)
        ms[threads] = round(statistics.median(hf_batch(loaded, [png], 8)["itl_ms"]), 1)
    torch.set_num_threads(min(ms, key=ms.get))
    return ms


def run_hf(args, model_cfg, engine_cfg, deadline: float) -> tuple[list[dict], dict]:
    """HF generate, static batches of the same requests, every batch size up to what the KV budget holds."""
    import torch

    from pipeline.model.loader import load_model

    loaded = load_model(model_cfg)  # the preset's seed: the replicas' weights
    pngs = workload().image_set(448, 4)[TILES]
    itl_by_threads = pick_threads(loaded, pngs[0])
    prompt_tokens = hf_batch(loaded, pngs[:1], 2)["prompt_tokens"]
    need = kv_bytes_untrimmed(loaded, engine_cfg, prompt_tokens, args.max_tokens)
    max_batch = engine_cfg.kv_budget_bytes // need
    sizes = sorted({b for b in args.users if b <= max_batch} | {max_batch})
    info = {"torch_threads": torch.get_num_threads(), "itl_ms_batch1_by_threads": itl_by_threads,
            "kv_bytes_per_request": need, "max_batch": max_batch, "prompt_tokens": prompt_tokens}
    points = []
    for b in sizes:
        if time.monotonic() + 30 > deadline:
            print(f"  {HF}: no time left for batch {b} (time budget)", flush=True)
            break
        runs = [hf_batch(loaded, [pngs[i % len(pngs)] for i in range(b)], args.max_tokens, deadline)
                for _ in range(args.hf_repeats)]
        points.append(hf_point(b, runs, need))
        print(_point_line(points[-1]), flush=True)
    return points, info


def hf_point(batch: int, runs: list[dict], kv_bytes: int) -> dict:
    seconds, tokens = sum(r["seconds"] for r in runs), sum(r["tokens"] for r in runs)
    ttfts = [r["ttft_ms"] for r in runs]  # every row of a batch gets its first token at once
    return {"system": HF, "users": batch, "requests_per_s": round(batch * len(runs) / seconds, 3),
            "output_tokens_per_s": round(tokens / seconds, 2),
            "ttft_p50_ms": round(statistics.median(ttfts), 1), "ttft_p99_ms": round(max(ttfts), 1),
            "itl_p50_ms": round(statistics.median(x for r in runs for x in r["itl_ms"]), 1),
            "failures": 0, "mean_decode_batch": batch, "requests": batch * len(runs),
            "complete": all(r["complete"] for r in runs),
            "other_cores": round(max(r["other_cores"] for r in runs), 2),
            "cross_kv_mib_per_request": round(kv_bytes / 2**20, 2), "shipped_mib_per_request": None}

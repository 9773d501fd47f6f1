"""`crosstrim bench prefix`: prefix caching, with and without, side by side in one run, in process (the encoder and
trimmer of `Pipeline`; a `Trimmer` and an `LLMEngine` a side, the "on" side's trimmer with its own prefix cache).
Two workloads: requests sharing a long system prompt, each with its own image and question, `--concurrency` in
flight (a closed loop); and a text-only chat that grows by a turn per request, one request at a time. Per side:
prompt rows computed per stage, bytes shipped from trimmer to decoder, TTFT p50/p99 (from the request's arrival:
its trim, then the engine, to its first token; the engine's part alone too), end-to-end tokens/s (encode + trim +
decode seconds), KV pages held; every request's tokens compared between the sides. Images are encoded once for
both sides (the encoder does not see the prefix). Prints a table and writes JSON."""

import time

import numpy as np
import torch

from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.inprocess import Pipeline
from pipeline.model.inputs import prepare_prompt
from pipeline.model.trimmer import Trimmer
from pipeline.model.trimmer_cache import TrimmerPrefixCache
from pipeline.orchestration import trimmer_input
from pipeline.quality.synthetic import noise_image
from pipeline.types import DecodeRequest

SENTENCE = "Answer about the picture in one short sentence, name colours and shapes exactly, and never guess. "
QUESTIONS = ["What colour dominates?", "How many shapes are there?", "Is anything red?", "Describe the corners."]


def add_prefix_args(bench) -> None:
    p = bench.add_parser("prefix", help="prefix caching on vs off: a shared system prompt, a growing chat")
    p.add_argument("--json", dest="json_path", default="bench-results/prefix.json")
    p.add_argument("--model", default="bundled:tiny-mllama")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--system-tokens", type=int, default=1000, help="the shared system prompt's length")
    p.add_argument("--turns", type=int, default=16, help="requests of the growing chat")
    p.add_argument("--concurrency", type=int, default=4, help="shared-system requests in flight")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trimmer-cache-mib", type=int, default=64, help="the 'on' side trimmer's prefix cache")


def _system(tokenizer, tokens: int) -> str:
    text = SENTENCE
    while len(tokenizer(text, add_special_tokens=False).input_ids) < tokens:
        text += SENTENCE
    return text


def _prepare(pipe, messages: list[dict], images: list) -> object:
    return prepare_prompt(pipe.loaded.processor, messages, images, 1, 16384)


def shared_system(pipe, args) -> tuple[list, dict]:
    """Every request: the system prompt, then its own image and question; encoded once for both sides, trimmed by
    each side's trimmer as it arrives."""
    system = _system(pipe.loaded.processor.tokenizer, args.system_tokens)
    items, shared, encode_s = [], [], 0.0
    for i in range(args.requests):
        user = [{"type": "image"}, {"type": "text", "text": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"}]
        prepared = _prepare(pipe, [{"role": "system", "content": system}, {"role": "user", "content": user}],
                            [noise_image(args.image_size, args.image_size, i)])
        t0 = time.perf_counter()
        items.append((trimmer_input(prepared), pipe.encoder.encode(prepared)))
        encode_s += time.perf_counter() - t0
        shared.append(prepared.blind_prefix)  # the rows before the image
    return items, {"stage_s": encode_s, "shared_rows": shared}


def chat(pipe, args) -> tuple[list[DecodeRequest], dict]:
    """Turn k's prompt: the whole conversation so far (each earlier answer a fixed text) and a new question."""
    messages, requests = [{"role": "system", "content": _system(pipe.loaded.processor.tokenizer, 200)}], []
    for k in range(args.turns):
        messages.append({"role": "user", "content": f"{QUESTIONS[k % len(QUESTIONS)]} Turn {k}."})
        requests.append(DecodeRequest(_prepare(pipe, messages, []).input_ids.tolist()))
        messages.append({"role": "assistant", "content": f"Answer {k}: {SENTENCE}"})
    shared = [0] + [r.prompt_len for r in requests[:-1]]  # the previous turn's prompt is this one's prefix
    return requests, {"stage_s": 0.0, "shared_rows": shared}


def drive(engine: LLMEngine, trimmer: Trimmer, items: list, params: SamplingParams, concurrency: int) -> dict:
    """A closed loop: `concurrency` requests in flight, the next arriving as one finishes; an image request is
    trimmed when it arrives (in the loop: the trim's seconds are in its TTFT and hold up the engine, as one
    process running both), a text-only one goes to the engine as it is."""
    pending, live, seqs, arrived, pages = list(items), [], [], [], []
    trim_s, shipped, t0 = 0.0, 0, time.perf_counter()
    while pending or live:
        now = time.monotonic()
        while pending and len(live) < concurrency:
            item = pending.pop(0)
            t = time.perf_counter()
            request = item if isinstance(item, DecodeRequest) else trimmer.trim(*item, TrimConfig())
            trim_s += time.perf_counter() - t
            shipped += request.nbytes
            live.append(engine.add_request(request, params))
            seqs.append(live[-1])
            arrived.append(now)
        engine.step()
        pages.append(engine.kv.blocks.used)  # held by sequences (cached pages no one holds are free)
        live = [s for s in live if not s.finished]
    seconds = time.perf_counter() - t0
    ttft = np.array([s.first_token_time - a for s, a in zip(seqs, arrived)]) * 1e3
    engine_ttft = np.array([s.first_token_time - s.arrival for s in seqs]) * 1e3
    stats = engine.stats()
    return {"decode_s": seconds - trim_s, "trim_s": trim_s, "tokens": sum(len(s.output_ids) for s in seqs),
            "decoder_rows": stats.prompt_rows_computed, "trimmer_rows": trimmer.rows_computed,
            "shipped_bytes": shipped, "cached_tokens": [s.cached_tokens for s in seqs],
            "ttft_ms_p50": float(np.percentile(ttft, 50)), "ttft_ms_p99": float(np.percentile(ttft, 99)),
            "engine_ttft_ms_p50": float(np.percentile(engine_ttft, 50)),
            "engine_ttft_ms_p99": float(np.percentile(engine_ttft, 99)),
            "peak_kv_pages_held": max(pages), "mean_kv_pages_held": float(np.mean(pages)),
            "prefix_cached_pages": stats.prefix_cached_pages,
            "output_ids": [s.output_ids for s in seqs]}


def compare(items: list, info: dict, sides: dict) -> dict:
    """Side by side: the figures of each side, the ratios, and whether every request's tokens are equal."""
    off, on = sides["off"], sides["on"]
    shared = info["shared_rows"]
    # Rows of the shared prefix the decoder computed after the first request (cached rows are skipped).
    computed = sum(max(s - c, 0) for s, c in zip(shared[1:], on["cached_tokens"][1:]))
    out = {"requests": len(items), "shared_rows_after_first": sum(shared[1:]),
           "shared_rows_skipped_fraction": 1 - computed / max(sum(shared[1:]), 1),
           "ttft_p50_speedup": off["ttft_ms_p50"] / on["ttft_ms_p50"],
           "ttft_p99_speedup": off["ttft_ms_p99"] / on["ttft_ms_p99"],
           "engine_ttft_p50_speedup": off["engine_ttft_ms_p50"] / on["engine_ttft_ms_p50"],
           "tokens_equal": off["output_ids"] == on["output_ids"]}
    if off["trimmer_rows"]:  # the trimmer's rows of the shared prefix after the first request: all but what it cached
        out["trimmer_shared_rows_skipped_fraction"] = 1 - (
            sum(shared[1:]) - (off["trimmer_rows"] - on["trimmer_rows"])) / max(sum(shared[1:]), 1)
    for name, side in sides.items():
        e2e = side["tokens"] / (info["stage_s"] + side["trim_s"] + side["decode_s"])
        out[name] = {k: v for k, v in side.items() if k not in ("output_ids", "cached_tokens")} | {
            "encode_s": info["stage_s"], "e2e_tokens_per_s": e2e, "cached_tokens": sum(side["cached_tokens"])}
    out["e2e_tokens_per_s_speedup"] = out["on"]["e2e_tokens_per_s"] / out["off"]["e2e_tokens_per_s"]
    return out


def run(args) -> int:
    from pipeline.bench.sources import write_json

    torch.set_num_threads(args.threads)
    pipe = Pipeline(ModelConfig(source=args.model, dtype="float32", device="cpu"))
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    result = {"command": "crosstrim bench prefix", "model": args.model, "threads": args.threads,
              "max_tokens": args.max_tokens, "concurrency": args.concurrency, "workloads": {}}
    for name, make, concurrency in (("shared_system", shared_system, args.concurrency), ("chat", chat, 1)):
        items, info = make(pipe, args)
        cfg = EngineConfig(kv_budget_bytes=2**30, max_model_len=8192, max_waiting=max(256, len(items)))
        sides = {}
        for side in ("off", "on"):
            engine = LLMEngine(pipe.loaded, cfg.model_copy(update={"prefix_caching": side == "on"}))
            cache = TrimmerPrefixCache.sized(args.trimmer_cache_mib if side == "on" else 0, cfg.block_size,
                                             pipe.loaded)
            sides[side] = drive(engine, Trimmer(pipe.loaded, TrimConfig(), cache), items, params, concurrency)
        result["workloads"][name] = compare(items, info, sides)
    shared = result["workloads"]["shared_system"]
    for key in ("shared_rows_skipped_fraction", "trimmer_shared_rows_skipped_fraction", "ttft_p50_speedup"):
        result[key] = shared[key]
    print_table(result)
    write_json(args.json_path, result)
    return 0 if all(w["tokens_equal"] for w in result["workloads"].values()) else 1


def print_table(result: dict) -> None:
    print(f"{'workload':<14} {'side':<4} {'dec rows':>9} {'trim rows':>9} {'shipped MB':>10} {'cached':>7} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'engine p50':>10} {'e2e tok/s':>9} {'pages held':>10}")
    for name, w in result["workloads"].items():
        for side in ("off", "on"):
            s = w[side]
            print(f"{name:<14} {side:<4} {s['decoder_rows']:>9} {s['trimmer_rows']:>9} {s['shipped_bytes'] / 1e6:>10.1f} "
                  f"{s['cached_tokens']:>7} {s['ttft_ms_p50']:>7.1f}ms {s['ttft_ms_p99']:>7.1f}ms "
                  f"{s['engine_ttft_ms_p50']:>8.1f}ms {s['e2e_tokens_per_s']:>9.1f} "
                  f"{s['mean_kv_pages_held']:>5.0f}/{s['peak_kv_pages_held']:<4}")
        trimmed = w.get("trimmer_shared_rows_skipped_fraction")
        print(f"{name:<14} shared rows skipped: decoder {w['shared_rows_skipped_fraction']:.3f}"
              + ("" if trimmed is None else f", trimmer {trimmed:.3f}")
              + f"; TTFT p50 x{w['ttft_p50_speedup']:.2f}, p99 x{w['ttft_p99_speedup']:.2f}, engine p50 x"
              f"{w['engine_ttft_p50_speedup']:.2f}, e2e x{w['e2e_tokens_per_s_speedup']:.2f}, tokens equal: "
              f"{w['tokens_equal']}")

"""`crosstrim bench decoder`: at one KV budget on the bench model, how many image requests fit and how fast
they decode, trimmed vs untrimmed vs HF generate (static batches, the same budget), plus the batch-1 step
against the memory-bandwidth bound. Prints a table and writes JSON. `crosstrim bench e2e` is the Serve app under
locust (loadtests/bench_e2e, registered as a `crosstrim.bench` entry point so this library never imports it)."""

import statistics
import time
from importlib.metadata import entry_points

import torch

from pipeline.bench import elastic as bench_elastic
from pipeline.bench import pipeline as bench_pipeline
from pipeline.bench import prefix as bench_prefix
from pipeline.bench.realistic import run_realistic
from pipeline.bench.sources import hf_batch, prepare_sources, write_json
from pipeline.config import EngineConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.quality.reference import trim_generated


def add_args(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (decoder: engine vs HF generate at one KV budget; "
                                              "pipeline: the three stages in process; prefix: prefix caching; e2e: Serve app)")
    bench = p.add_subparsers(dest="bench", required=True)
    d = bench.add_parser("decoder", help="decoder engine on the bench model preset")
    d.add_argument("--json", dest="json_path", default="bench-results/decoder.json")
    d.add_argument("--requests", type=int, default=24)
    d.add_argument("--max-tokens", type=int, default=32)
    d.add_argument("--untrimmed-slots", type=int, default=6, help="the KV budget fits this many untrimmed requests")
    d.add_argument("--k-ratio", type=float, default=None, help="default: the TrimConfig default policy")
    d.add_argument("--hf-batches", default="1,2,4,6")
    d.add_argument("--workload", choices=("static", "realistic"), default="static",
                   help="realistic: max_tokens 1024, each answer ending after 8-128 tokens (seeded); paged vs "
                        "reserved KV vs HF generate at one budget")
    d.add_argument("--tiles", type=int, default=None, help="realistic: tiles x tiles tiles an image (default 1)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    d.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="float32")
    d.add_argument("--threads", type=int, default=None,
                   help="torch threads for every system in the run (default: torch's); 1 on a shared machine, "
                        "where a second busy process makes 2-thread GEMMs ~10x slower")
    bench_pipeline.add_pipeline_args(bench)
    bench_prefix.add_prefix_args(bench)
    bench_elastic.add_args(bench)
    for ep in entry_points(group="crosstrim.bench"):  # benches of other packages (the Serve app's: loadtests/)
        RUNNERS[ep.name] = ep.load()(bench)


RUNNERS = {}  # bench name -> run(args), filled by add_args


def run(args) -> int:
    if args.bench == "decoder":
        return run_decoder(args)
    if args.bench == "pipeline":
        return bench_pipeline.run(args)
    if args.bench == "prefix":
        return bench_prefix.run(args)
    if args.bench == "elastic":
        return bench_elastic.run(args)
    return RUNNERS[args.bench](args)


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes copied per second by a large tensor copy (the memcpy convention: N bytes read and N written in
    time t give N / t; STREAM counts the traffic, 2N / t), best of a few."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def _run_engine(loaded, sources, budget, params):
    # "reserved": every request holds its worst case (prompt + max_tokens), as this bench has always compared
    engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=budget, max_running=256, max_waiting=4096,
                                            max_model_len=4096, kv_allocation="reserved"))
    seqs = [engine.add_request(s, params) for s in sources]
    admitted_at_once = engine.count_admissible()
    batch_sizes, step_ms = [], []
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
        st = engine.stats()
        if st.last_batch_size:
            batch_sizes.append(st.last_batch_size)
            step_ms.append(st.last_step_ms)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(s.output_ids) for s in seqs)
    return dict(admitted_at_once=admitted_at_once, tokens=tokens, seconds=elapsed, tokens_per_s=tokens / elapsed,
                mean_batch=statistics.mean(batch_sizes), step_ms_mean=statistics.mean(step_ms)), seqs


def _hf_generate(loaded, prepared_list, max_tokens):
    """HF generate over one static batch (same prompt, so no padding); returns (tokens, seconds)."""
    model = loaded.model
    batch = hf_batch(loaded, prepared_list)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return out.shape[0] * max_tokens, time.perf_counter() - t0, out[:, prepared_list[0].input_ids.numel():]


def hf_batches_that_fit(requested: str, fit: int) -> list[int]:
    """The requested HF batch sizes ("2,4") whose worst-case KV fits the budget (`fit` requests)."""
    return [b for b in (int(x) for x in requested.split(",")) if 1 <= b <= fit]


def hf_summary(hf_runs: dict[int, float], engine_tokens_per_s: float) -> dict:
    """HF generate's best batch; None everywhere when no requested batch fit the budget."""
    best = max(hf_runs, key=hf_runs.get) if hf_runs else None
    return {
        "tokens_per_s_hf_generate": round(hf_runs[best], 2) if hf_runs else None, "hf_generate_best_batch": best,
        "hf_generate_tokens_per_s_by_batch": {str(k): round(v, 2) for k, v in hf_runs.items()},
        "trimmed_vs_hf_generate": round(engine_tokens_per_s / hf_runs[best], 3) if hf_runs else None,
    }


def run_decoder(args) -> int:
    if args.workload == "realistic":
        return run_realistic(args)
    loaded, prepared, trimmed, untrimmed, stage_ms, trim_cfg = prepare_sources(args, tiles=2)
    n_distinct = len(prepared)
    pick = lambda xs: [xs[i % n_distinct] for i in range(args.requests)]  # noqa: E731
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)

    probe = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**20, max_model_len=4096))
    need_full = probe.kv_bytes_for(untrimmed[0], params)
    budget = need_full * args.untrimmed_slots + need_full // 2
    del probe

    res_trim, seqs_trim = _run_engine(loaded, pick(trimmed), budget, params)
    res_full, seqs_full = _run_engine(loaded, pick(untrimmed), budget, params)

    # HF generate: static batches of the same requests, batch sizes whose KV fits the same budget.
    hf_runs, exact = {}, None  # exact: only checked when batch 1 runs
    for b in hf_batches_that_fit(args.hf_batches, res_full["admitted_at_once"]):
        tokens, seconds, out = _hf_generate(loaded, [prepared[i % n_distinct] for i in range(b)], args.max_tokens)
        hf_runs[b] = tokens / seconds
        if b == 1:  # the engine's untrimmed greedy tokens equal HF's on the bench model too
            hf_first = trim_generated(out[0].tolist(), loaded.model)[: args.max_tokens]
            exact = seqs_full[0].output_ids[: len(hf_first)] == hf_first
    hf = hf_summary(hf_runs, res_trim["tokens_per_s"])

    # Batch-1 decode step against the bandwidth bound: weights + KV read per step over copy bandwidth.
    one, _ = _run_engine(loaded, [trimmed[0]], budget, params)
    text = loaded.text
    weight_bytes = sum(p.numel() * p.element_size() for n, p in text.named_parameters() if "embed_tokens" not in n)
    weight_bytes += loaded.model.lm_head.weight.numel() * loaded.model.lm_head.weight.element_size()
    tc = loaded.text_config
    per_tok_layer = 2 * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * loaded.dtype.itemsize
    n_self = tc.num_hidden_layers - len(tc.cross_attention_layers)
    mean_pos = trimmed[0].prompt_len + args.max_tokens / 2
    kv_bytes = per_tok_layer * (n_self * mean_pos + len(tc.cross_attention_layers) * trimmed[0].num_kept)
    bandwidth = copy_bandwidth()
    bound_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3

    kept_fraction = statistics.mean(t.image.kept_fraction for t in trimmed)
    result = {
        "model": {"text_params_M": round(sum(p.numel() for p in text.parameters()) / 1e6, 1),
                  "visual_tokens_per_image": untrimmed[0].num_kept, "dtype": str(loaded.dtype),
                  "cross_kv_bytes_per_image_full": untrimmed[0].image.cross_kv_bytes,
                  "self_kv_bytes_per_1000_text_tokens": per_tok_layer * n_self * 1000},
        "policy": trim_cfg.model_dump(),
        "requests": args.requests, "max_tokens": args.max_tokens, "kv_budget_bytes": budget,
        "kept_fraction": round(kept_fraction, 4),
        "max_concurrent_untrimmed": res_full["admitted_at_once"],
        "max_concurrent_trimmed": res_trim["admitted_at_once"],
        "concurrency_ratio": round(res_trim["admitted_at_once"] / res_full["admitted_at_once"], 3),
        "tokens_per_s_untrimmed": round(res_full["tokens_per_s"], 2),
        "tokens_per_s_trimmed": round(res_trim["tokens_per_s"], 2),
        **hf,
        "trimmed_vs_untrimmed": round(res_trim["tokens_per_s"] / res_full["tokens_per_s"], 3),
        "mean_batch_untrimmed": round(res_full["mean_batch"], 2), "mean_batch_trimmed": round(res_trim["mean_batch"], 2),
        "decode_step_ms_batch1": round(one["step_ms_mean"], 2),
        "bandwidth_bound_ms_batch1": round(bound_ms, 2),
        "step_vs_bound_batch1": round(one["step_ms_mean"] / bound_ms, 3),
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 2), "torch_threads": torch.get_num_threads(),
        # The same bound if the copy's read + write traffic (2N / t, STREAM's convention) is the bandwidth.
        "bandwidth_bound_ms_batch1_stream_convention": round(bound_ms / 2, 2),
        "step_vs_bound_batch1_stream_convention": round(one["step_ms_mean"] / (bound_ms / 2), 3),
        "stage_ms_mean": {k: round(statistics.mean(v), 1) for k, v in stage_ms.items()},
        "engine_untrimmed_equals_hf_greedy_batch1": exact,
        "note": "engine tokens/s time the decoder engine (prefill resume + decode) on precomputed DecodeRequests; "
                "HF generate's include its vision encoder and full prefill (see stage_ms_mean for those costs)",
    }
    _print_table(result)
    write_json(args.json_path, result)
    return 0


def _print_table(r: dict) -> None:
    rows = [
        ("kept_fraction", r["kept_fraction"]),
        ("max_concurrent untrimmed / trimmed", f'{r["max_concurrent_untrimmed"]} / {r["max_concurrent_trimmed"]} '
                                               f'(x{r["concurrency_ratio"]})'),
        ("tokens/s untrimmed", r["tokens_per_s_untrimmed"]),
        ("tokens/s trimmed", f'{r["tokens_per_s_trimmed"]} (x{r["trimmed_vs_untrimmed"]} untrimmed)'),
        ("tokens/s HF generate (best batch)",
         (f'{r["tokens_per_s_hf_generate"]} (batch {r["hf_generate_best_batch"]}; '
          f'trimmed is x{r["trimmed_vs_hf_generate"]})') if r["hf_generate_best_batch"]
         else "no requested batch fits the budget"),
        ("mean decode batch untrimmed / trimmed", f'{r["mean_batch_untrimmed"]} / {r["mean_batch_trimmed"]}'),
        ("decode step batch 1 (ms)", f'{r["decode_step_ms_batch1"]} vs bound {r["bandwidth_bound_ms_batch1"]} '
                                     f'(x{r["step_vs_bound_batch1"]})'),
        ("copy bandwidth (GB/s)", r["copy_bandwidth_GBps"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

"""`crosstrim bench decoder --workload realistic`: every request asks max_tokens 1024 and its answer ends after a
seeded 8-128 tokens (the request is ended there, as an EOS would). At one KV budget: paged trimmed, paged
untrimmed, whole-worst-case reservation trimmed (the pre-paging engine) and HF generate; concurrency, tokens/s,
KV utilisation (bytes written / bytes held, time-averaged) and preemptions. Prints a table and writes JSON."""

import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.sources import hf_batch, prepare_sources
from pipeline.config import EngineConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams

MAX_TOKENS = 1024


def _engine(loaded, budget: int, mode: str) -> LLMEngine:
    return LLMEngine(loaded, EngineConfig(kv_budget_bytes=budget, kv_allocation=mode, max_running=4096,
                                          max_waiting=100_000, max_model_len=4096))


def run_workload(loaded, sources, lengths: list[int], budget: int, mode: str) -> dict:
    """Runs every request to its drawn length; concurrency and utilisation sampled at every step, weighted by
    the step's duration; "saturated" steps are those with requests still waiting for memory."""
    engine = _engine(loaded, budget, mode)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    seqs = [engine.add_request(s, params) for s in sources]
    ends = {s.request_id: n for s, n in zip(seqs, lengths)}
    peak, weighted, util, util_sat, time_sat, total = 0, 0.0, 0.0, 0.0, 0.0, 0.0
    t0 = time.perf_counter()
    while engine.has_work():
        ts = time.perf_counter()
        outputs = engine.step()
        dt = time.perf_counter() - ts
        st = engine.stats()
        peak = max(peak, st.running)
        weighted += st.running * dt
        total += dt
        if st.kv_used_bytes:
            u = st.kv_written_bytes / st.kv_used_bytes
            util += u * dt
            if st.waiting:
                util_sat, time_sat = util_sat + u * dt, time_sat + dt
        for out in outputs:
            if not out.finished and out.completion_tokens >= ends[out.request_id]:
                engine.abort(out.request_id)  # the answer ends here
    elapsed = time.perf_counter() - t0
    tokens = sum(len(s.output_ids) for s in seqs)
    assert [len(s.output_ids) for s in seqs] == lengths, "every request must end at its drawn length"
    return {"max_concurrent": peak, "mean_concurrent": round(weighted / total, 2),
            "tokens_per_s": round(tokens / elapsed, 2), "tokens": tokens, "seconds": round(elapsed, 2),
            "kv_utilisation": round(util / total, 4),
            "kv_utilisation_saturated": round(util_sat / time_sat, 4) if time_sat else None,
            "preemptions": engine.stats().preemptions, "kv_used_bytes_after": engine.stats().kv_used_bytes}


def hf_generate_workload(loaded, prepared, lengths: list[int], batch: int) -> dict:
    """HF generate in static batches of `batch` (what its worst-case KV lets fit the budget): each batch runs
    until its longest answer ends; only each request's own tokens count."""
    model, tokens, elapsed = loaded.model, 0, 0.0
    for i in range(0, len(prepared), batch):
        group, ends = prepared[i : i + batch], lengths[i : i + batch]
        inputs = hf_batch(loaded, group)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=max(ends), min_new_tokens=max(ends), do_sample=False)
        elapsed += time.perf_counter() - t0
        tokens += sum(ends)
    return {"batch": batch, "requests": len(prepared), "tokens_per_s": round(tokens / elapsed, 2)}


def run_realistic(args) -> int:
    loaded, prepared, trimmed, untrimmed, stage_ms, trim_cfg = prepare_sources(args, tiles=args.tiles or 1)
    n = len(prepared)

    def pick(xs):
        return [xs[i % n] for i in range(args.requests)]

    lengths = np.random.default_rng(args.seed).integers(8, 129, args.requests).tolist()
    probe = _engine(loaded, 2**20, "reserved")
    need_full = probe.kv_bytes_for(untrimmed[0], SamplingParams(max_tokens=MAX_TOKENS))
    budget = need_full * args.untrimmed_slots + need_full // 2
    runs = {
        "paged_trimmed": run_workload(loaded, pick(trimmed), lengths, budget, "paged"),
        "reserved_trimmed": run_workload(loaded, pick(trimmed), lengths, budget, "reserved"),
        "paged_untrimmed": run_workload(loaded, pick(untrimmed), lengths, budget, "paged"),
    }
    hf_batch = args.untrimmed_slots  # HF holds each request's worst case (untrimmed) for the batch's life
    hf_n = min(args.requests, 2 * hf_batch)
    hf = hf_generate_workload(loaded, pick(prepared)[:hf_n], lengths[:hf_n], hf_batch)
    pt, rt = runs["paged_trimmed"], runs["reserved_trimmed"]
    result = {
        "workload": {"requests": args.requests, "max_tokens": MAX_TOKENS, "answer_tokens": "uniform 8-128",
                     "seed": args.seed, "tiles": args.tiles or 1, "visual_tokens": untrimmed[0].num_kept,
                     "kept_tokens_mean": round(float(np.mean([t.num_kept for t in trimmed])), 1)},
        "policy": trim_cfg.model_dump(), "kv_budget_bytes": budget, "torch_threads": torch.get_num_threads(),
        "paged_max_concurrent_trimmed": pt["max_concurrent"],
        "reserved_max_concurrent_trimmed": rt["max_concurrent"],
        "paged_vs_reserved_concurrency_trimmed": round(pt["max_concurrent"] / rt["max_concurrent"], 3),
        "paged_kv_utilisation_trimmed": pt["kv_utilisation_saturated"],
        "reserved_kv_utilisation_trimmed": rt["kv_utilisation_saturated"],
        "tokens_per_s_paged_trimmed": pt["tokens_per_s"], "tokens_per_s_reserved_trimmed": rt["tokens_per_s"],
        "tokens_per_s_paged_untrimmed": runs["paged_untrimmed"]["tokens_per_s"],
        "tokens_per_s_hf_generate": hf["tokens_per_s"],
        "preemptions": pt["preemptions"],
        "runs": runs, "hf_generate": hf, "stage_ms_mean": {k: round(float(np.mean(v)), 1) for k, v in stage_ms.items()},
        "note": "kv_utilisation is bytes written / bytes held, time-averaged over the steps with requests waiting "
                "(saturation); runs[*].kv_utilisation averages over the whole run. HF generate runs the first "
                f"{hf_n} requests in static batches of {hf_batch}, its tokens/s include its encoder and prefill.",
    }
    for name, r in runs.items():
        print(f"{name:<18} max/mean concurrent {r['max_concurrent']:>4} / {r['mean_concurrent']:<7} "
              f"tokens/s {r['tokens_per_s']:<8} KV util (saturated) {r['kv_utilisation_saturated']}  "
              f"preemptions {r['preemptions']}")
    print(f"{'hf_generate':<18} batch {hf_batch}, tokens/s {hf['tokens_per_s']}")
    print(f"paged / reserved concurrency (trimmed): x{result['paged_vs_reserved_concurrency_trimmed']}")
    path = Path(args.json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0

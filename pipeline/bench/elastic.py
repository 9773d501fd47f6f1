"""`crosstrim bench elastic`: fixed trimming against elastic trimming (docs/elastic.md) under Poisson arrivals at
one KV budget, on the demo model and the synthetic VQA task (known answers). The three stages run in process
(Pipeline); time is simulated: every engine step costs --step-ms, arrivals are drawn on that clock, so the numbers
do not depend on how busy the (shared) machine is. Prints a table, writes JSON and a PNG figure."""

import random
import statistics
import time

from pipeline.bench.sources import write_json
from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.inprocess import Pipeline
from pipeline.quality.synthetic import generate_samples


def settings(floor: float) -> dict[str, TrimConfig]:
    """name -> the trim config every request of the run gets"""
    return {"untrimmed": TrimConfig(policy="none"),
            "fixed default": TrimConfig(),  # topk_union at the default k_ratio
            "fixed floor": TrimConfig(policy="target", target_fraction=floor),
            "elastic": TrimConfig(policy="elastic", floor_fraction=floor, ceiling_fraction=1.0)}


SETTINGS = settings(0.21)


def add_args(bench) -> None:
    p = bench.add_parser("elastic", help="fixed vs elastic trimming under Poisson load on the demo model")
    p.add_argument("--json", dest="json_path", default="bench-results/elastic.json")
    p.add_argument("--figure", default="bench-results/elastic.png")
    p.add_argument("--model", default="bundled:tiny-mllama-vqa")
    p.add_argument("--requests", type=int, default=48, help="requests per load (the same for every setting)")
    p.add_argument("--loads", default="0.5,1,2,4", help="offered loads, x what the untrimmed budget sustains")
    p.add_argument("--untrimmed-slots", type=int, default=6,
                   help="the KV budget holds this many untrimmed requests at their max_tokens")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--max-waiting", type=int, default=16, help="the engine's queue; beyond it a request is refused")
    p.add_argument("--step-ms", type=float, default=25.0, help="simulated cost of one engine step")
    p.add_argument("--slo-ttft-s", type=float, default=0.25, help="goodput counts correct answers within this TTFT")
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("--floor", type=float, default=0.21, help="the fixed floor's and elastic's floor fraction")


def run(args) -> int:
    pipe = Pipeline(ModelConfig(source=args.model, dtype="float32", device="cpu"))
    samples = generate_samples(args.requests, args.seed)
    prepared = [pipe.prepare(s.prompt, [s.image]) for s in samples]
    visuals = [pipe.encoder.encode(p) for p in prepared]  # encoded once: every setting trims the same features
    untrimmed = [pipe.trimmer.trim(p, v, TrimConfig(policy="none")) for p, v in zip(prepared, visuals)]
    per_request = statistics.mean(pipe.engine.kv_bytes_for(r, SamplingParams(max_tokens=args.max_tokens))
                                  for r in untrimmed)  # the mean untrimmed request at its max_tokens
    budget = int(args.untrimmed_slots * per_request)
    print(f"KV budget {budget} bytes: {args.untrimmed_slots} untrimmed requests of {per_request:.0f} bytes "
          f"(visual tokens {statistics.mean(sum(r.image.visual_tokens) for r in untrimmed):.0f} a request)")
    step_s = args.step_ms / 1e3
    engine_cfg = EngineConfig(kv_budget_bytes=budget, max_running=64, max_waiting=args.max_waiting,
                              max_model_len=512, block_size=16, kv_watermark=0.0)
    # What the untrimmed budget sustains: its slots, each held for as many steps as an untrimmed answer takes (the
    # prefill step gives the first token, a decode step each next one), measured on these requests.
    roomy = LLMEngine(pipe.loaded, engine_cfg.model_copy(update={"kv_budget_bytes": budget * 8,
                                                               "max_waiting": len(untrimmed)}))
    lengths = [len(s.output_ids) for s in roomy.generate(untrimmed, SamplingParams(max_tokens=args.max_tokens))]
    del roomy
    capacity = args.untrimmed_slots / (statistics.mean(lengths) * step_s)
    print(f"untrimmed answers: {statistics.mean(lengths):.2f} tokens; capacity {capacity:.1f} requests/s")
    cache: dict = {}
    results, t0 = [], time.perf_counter()
    for load in (float(x) for x in args.loads.split(",")):
        rng = random.Random(args.seed)
        arrivals, t = [], 0.0
        for _ in samples:
            t += rng.expovariate(load * capacity)
            arrivals.append(t)
        for name, cfg in settings(args.floor).items():
            r = simulate(pipe, engine_cfg, prepared, visuals, samples, arrivals, cfg, args, cache)
            results.append({"setting": name, "load": load, "offered_rps": round(load * capacity, 3), **r})
            print(f"load {load:>4}x {name:>14}: accuracy {r['accuracy']:.3f} goodput {r['goodput']:.2f}/s "
                  f"ttft p50 {r['ttft_p50_s']:.2f}s p99 {r['ttft_p99_s']:.2f}s refused {r['refused']} "
                  f"preempted {r['preempted']} shed {r['shed']} kept {r['kept_fraction_mean']:.3f}", flush=True)
    out = {"model": args.model, "clock": f"simulated: {args.step_ms} ms an engine step",
           "kv_budget_bytes": budget, "untrimmed_slots": args.untrimmed_slots, "capacity_rps": round(capacity, 3),
           "requests_per_load": args.requests, "max_tokens": args.max_tokens, "max_waiting": args.max_waiting,
           "slo_ttft_s": args.slo_ttft_s, "settings": {k: v.model_dump(exclude_defaults=True)
                                                       for k, v in settings(args.floor).items()},
           "wall_s": round(time.perf_counter() - t0, 1), "results": results, "verdict": verdict(results)}
    write_json(args.json_path, out)
    if args.figure:
        plot(results, args.figure)
    return 0


def simulate(pipe, engine_cfg, prepared, visuals, samples, arrivals, cfg, args, cache) -> dict:
    """One setting at one load: requests arrive at `arrivals` (simulated seconds), are trimmed at arrival (an
    elastic one at the engine's pressure then) and queued, or refused when the queue is full."""
    pipe.engine = None  # the previous run's arena freed first
    pipe.engine = engine = LLMEngine(pipe.loaded, engine_cfg)
    params = SamplingParams(max_tokens=args.max_tokens)
    step_s, now, nxt = args.step_ms / 1e3, 0.0, 0
    seqs, refused, first, pressures = {}, 0, {}, []
    while nxt < len(arrivals) or engine.has_work():
        if not engine.has_work() and nxt < len(arrivals):
            now = max(now, arrivals[nxt])
        while nxt < len(arrivals) and arrivals[nxt] <= now:
            i, nxt = nxt, nxt + 1
            if not engine.has_room():
                refused += 1
                continue
            trim = pipe.with_pressure(cfg)
            if trim.policy == "elastic":
                pressures.append(trim.pressure)
            # fixed settings trim a request once for every load; elastic once per fraction it is given
            key = (i, cfg.policy, round(trim.elastic_fraction(), 4) if trim.policy == "elastic" else None)
            if key not in cache:
                cache[key] = pipe.trimmer.trim(prepared[i], visuals[i], trim)
            seqs[i] = engine.add_request(cache[key], params)
        if engine.has_work():
            engine.step()
            now += step_s
            for i, s in seqs.items():
                if i not in first and s.output_ids:
                    first[i] = now - arrivals[i]
    answered = list(seqs)
    correct = [i for i in answered if seqs[i].text.strip() == samples[i].answer.strip()]
    good = [i for i in correct if first[i] <= args.slo_ttft_s]
    ttft = sorted(first[i] for i in answered)
    done = [first[i] + arrivals[i] for i in answered]
    window = arrivals[-1]
    stats = engine.stats()
    return {"accuracy": round(len(correct) / max(len(answered), 1), 4),
            "accuracy_all": round(len(correct) / len(arrivals), 4),  # refusals count as wrong
            "goodput": round(len(good) / window, 3), "ttft_p50_s": round(_pct(ttft, 50), 3),
            "ttft_p99_s": round(_pct(ttft, 99), 3), "completion_p99_s": round(_pct(sorted(done), 99), 3),
            "refused": refused, "preempted": stats.preemptions, "shed": stats.sheds,
            "shed_tokens": stats.shed_tokens,
            "kept_fraction_mean": round(statistics.mean(s.image.num_kept / sum(s.image.visual_tokens)
                                                         for s in seqs.values()), 4),
            "pressure_mean": round(statistics.mean(pressures), 3) if pressures else None}


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def verdict(results: list[dict]) -> dict:
    """The issue's targets: within 1 point of the best fixed accuracy at the lowest load, within 5% of the best fixed
    goodput at the highest, and not dominated (worse on both) by any fixed setting at any load."""
    loads = sorted({r["load"] for r in results})
    at = {(r["setting"], r["load"]): r for r in results}
    fixed = [s for s in SETTINGS if s != "elastic"]
    low, high = loads[0], loads[-1]
    best_acc = max(at[s, low]["accuracy"] for s in fixed)
    best_good = max(at[s, high]["goodput"] for s in fixed)
    pareto, beats = {}, {}
    for load in loads:
        e = at["elastic", load]
        pareto[str(load)] = not any(at[s, load]["accuracy"] > e["accuracy"] and at[s, load]["goodput"] > e["goodput"]
                                    for s in fixed)
        beats[str(load)] = all(e["accuracy"] > at[s, load]["accuracy"] or e["goodput"] > at[s, load]["goodput"]
                               for s in fixed)
    return {"accuracy_gap_at_lowest_load": round(best_acc - at["elastic", low]["accuracy"], 4),
            "goodput_ratio_at_highest_load": round(at["elastic", high]["goodput"] / best_good, 4) if best_good else None,
            "not_dominated_at_load": pareto, "beats_each_fixed_on_one_at_load": beats}


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_good) = plt.subplots(1, 2, figsize=(10, 4))
    for name in SETTINGS:
        rows = sorted((r for r in results if r["setting"] == name), key=lambda r: r["load"])
        loads = [r["load"] for r in rows]
        ax_acc.plot(loads, [r["accuracy"] for r in rows], marker="o", label=name)
        ax_good.plot(loads, [r["goodput"] for r in rows], marker="o", label=name)
    for ax, label in ((ax_acc, "accuracy (answered)"), (ax_good, "goodput (correct within TTFT SLO, req/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("offered load (x untrimmed capacity)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")

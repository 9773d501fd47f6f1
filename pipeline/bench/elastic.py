"""`crosstrim bench elastic`: fixed trimming against elastic trimming (docs/elastic.md) under Poisson arrivals at
one KV budget, on the demo model and the synthetic VQA task (known answers). The three stages run in process
(Pipeline); time is simulated: each engine step costs what a step-cost model (pipeline/bench/step_cost.py, fitted
to timed real steps) says its work costs, arrivals are drawn on that clock, so the numbers do not depend on how
busy the (shared) machine is. Prints a table, writes JSON and a PNG figure (pipeline/bench/elastic_report.py)."""

import random
import statistics
import time

from pipeline.bench.elastic_report import good, plot, verdict
from pipeline.bench.sources import write_json
from pipeline.bench.step_cost import StepCost, step_cost, tile_tokens
from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.inprocess import Pipeline
from pipeline.model.selection import topk_count
from pipeline.quality.synthetic import generate_samples

FLOOR = TrimConfig().floor_fraction  # the deployment default
SLOS = (0.5, 1.0, 2.0, 4.0)  # TTFT SLOs (s) goodput is also reported at


def settings(floor: float) -> dict[str, TrimConfig]:
    """name -> the trim config every request of the run gets"""
    return {"untrimmed": TrimConfig(policy="none"),
            "fixed default": TrimConfig(),  # topk_union at the default k_ratio
            "fixed floor": TrimConfig(policy="target", target_fraction=floor),
            "elastic": TrimConfig(policy="elastic", floor_fraction=floor, ceiling_fraction=1.0)}


def add_args(bench) -> None:
    p = bench.add_parser("elastic", help="fixed vs elastic trimming under Poisson load on the demo model")
    p.add_argument("--json", dest="json_path", default="bench-results/elastic.json")
    p.add_argument("--figure", default="bench-results/elastic.png")
    p.add_argument("--model", default="bundled:tiny-mllama-vqa")
    p.add_argument("--requests", type=int, default=1000, help="requests per load (the same for every setting)")
    p.add_argument("--loads", default="0.5,1,1.5,2,4", help="offered loads, x what the untrimmed budget sustains")
    p.add_argument("--untrimmed-slots", type=int, default=6,
                   help="the KV budget holds this many untrimmed requests at their max_tokens")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--max-waiting", type=int, default=16, help="the engine's queue; beyond it a request is refused")
    p.add_argument("--step-cost", default="bench",
                   help="the simulated clock: a calibration in step_cost.CALIBRATED (demo, bench), the JSON "
                        "scripts/calibrate_step_cost.py wrote, or const:MS (every step MS, the old clock)")
    # A request the queue accepts can still meet it, as with the old 25 ms clock's 0.25 s: on `bench`'s clock a full
    # queue (16) drains in ~2.7 s at the trimmed settings' ~6 requests/s, and an answer takes ~1 s more.
    p.add_argument("--slo-ttft-s", type=float, default=4.0,
                   help="goodput counts correct answers within this TTFT")
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("--floor", type=float, default=FLOOR, help="the fixed floor's and elastic's floor fraction")


def run(args) -> int:
    t0 = time.perf_counter()
    pipe = Pipeline(ModelConfig(source=args.model, dtype="float32", device="cpu"))
    cost, clock = step_cost(args.step_cost)
    tile = tile_tokens(pipe.loaded)
    samples = generate_samples(args.requests, args.seed)
    prepared = [pipe.prepare(s.prompt, [s.image]) for s in samples]
    visuals = [pipe.encoder.encode(p) for p in prepared]  # encoded once: every setting trims the same features
    cache: dict = {}
    untrimmed = [trimmed(pipe, i, prepared, visuals, TrimConfig(policy="none"), cache) for i in range(len(samples))]
    per_request = statistics.mean(pipe.engine.kv_bytes_for(r, SamplingParams(max_tokens=args.max_tokens))
                                  for r in untrimmed)  # the mean untrimmed request at its max_tokens
    budget = int(args.untrimmed_slots * per_request)
    print(f"KV budget {budget} bytes: {args.untrimmed_slots} untrimmed requests of {per_request:.0f} bytes "
          f"(visual tokens {statistics.mean(sum(r.image.visual_tokens) for r in untrimmed):.0f} a request); "
          f"clock: {clock}", flush=True)
    engine_cfg = EngineConfig(kv_budget_bytes=budget, max_running=64, max_waiting=args.max_waiting,
                              max_model_len=512, block_size=16, kv_watermark=0.0)
    capacity = sustained_rps(pipe, engine_cfg, untrimmed, args, cost, tile)
    print(f"capacity: the untrimmed budget, saturated, completes {capacity:.2f} requests/s", flush=True)
    results, per_request_outcomes, windows = [], {}, {}
    for load in (float(x) for x in args.loads.split(",")):
        rng = random.Random(args.seed)
        arrivals, t = [], 0.0
        for _ in samples:
            t += rng.expovariate(load * capacity)
            arrivals.append(t)
        windows[load] = arrivals[-1]
        for name, cfg in settings(args.floor).items():
            r, outcomes = simulate(pipe, engine_cfg, prepared, visuals, samples, arrivals, cfg, args, cache, cost,
                                   tile)
            results.append({"setting": name, "load": load, "offered_rps": round(load * capacity, 3), **r})
            per_request_outcomes[name, load] = outcomes
            print(f"load {load:>4}x {name:>14}: accuracy {r['accuracy']:.3f} goodput {r['goodput']:.2f}/s "
                  f"ttft p50 {r['ttft_p50_s']:.3f}s p99 {r['ttft_p99_s']:.3f}s refused {r['refused']} "
                  f"preempted {r['preempted']} shed {r['shed']} kept {r['kept_fraction_mean']:.3f}", flush=True)
    out = {"model": args.model, "clock": clock, "step_cost": cost.as_dict(), "tile_tokens": tile,
           "kv_budget_bytes": budget, "untrimmed_slots": args.untrimmed_slots, "capacity_rps": round(capacity, 3),
           "requests_per_load": args.requests, "seed": args.seed, "max_tokens": args.max_tokens,
           "max_waiting": args.max_waiting, "slo_ttft_s": args.slo_ttft_s,
           "settings": {k: v.model_dump(exclude_defaults=True) for k, v in settings(args.floor).items()},
           "trims": len(cache), "results": results,
           "verdict": verdict(results, per_request_outcomes, windows, args.slo_ttft_s),
           # how much the verdict hangs on the SLO stated
           "verdict_at_slo": {str(slo): verdict(results, per_request_outcomes, windows, slo) for slo in slos(args)},
           "wall_s": round(time.perf_counter() - t0, 1)}
    write_json(args.json_path, out)
    if args.figure:
        plot(results, args.figure, args.slo_ttft_s)
    return 0


def trimmed(pipe, i: int, prepared, visuals, trim: TrimConfig, cache: dict):
    """Request i trimmed by `trim`, once per distinct outcome: fixed settings once for every load, elastic once per
    kept count (target and elastic keep exactly ceil(f x tokens) an image, so the count decides the tokens)."""
    if trim.policy == "elastic":
        counts = tuple(topk_count(trim.elastic_fraction(), n) for n in visuals[i].token_valid.sum(dim=1).tolist())
        key = (i, "elastic", trim.floor_fraction, counts)
    else:
        key = (i, trim.model_dump_json())
    if key not in cache:
        cache[key] = pipe.trimmer.trim(prepared[i], visuals[i], trim)
    return cache[key]


def sustained_rps(pipe, engine_cfg, untrimmed, args, cost: StepCost, tile: int) -> float:
    """What the untrimmed budget sustains: every request queued at once (an unbounded queue), requests completed
    per simulated second."""
    engine = LLMEngine(pipe.loaded, engine_cfg.model_copy(update={"max_waiting": len(untrimmed)}))
    params = SamplingParams(max_tokens=args.max_tokens)
    for r in untrimmed:
        engine.add_request(r, params)
    now = 0.0
    while engine.has_work():
        engine.step()
        now += cost.seconds(engine.last_work, tile)
    return len(untrimmed) / now


def simulate(pipe, engine_cfg, prepared, visuals, samples, arrivals, cfg, args, cache, cost: StepCost,
             tile: int) -> tuple[dict, list[dict | None]]:
    """One setting at one load: requests arrive at `arrivals` (simulated seconds), are trimmed at arrival (an
    elastic one at the engine's pressure then) and queued, or refused when the queue is full. Returns the
    figures and each request's outcome (None: refused) for the paired comparisons."""
    pipe.engine = None  # the previous run's arena freed first
    pipe.engine = engine = LLMEngine(pipe.loaded, engine_cfg)
    params = SamplingParams(max_tokens=args.max_tokens)
    now, nxt, steps = 0.0, 0, 0
    seqs, refused, first, done, pressures = {}, 0, {}, {}, []
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
            seqs[i] = engine.add_request(trimmed(pipe, i, prepared, visuals, trim, cache), params)
        if engine.has_work():
            engine.step()
            steps += 1
            now += cost.seconds(engine.last_work, tile)
            for i, s in seqs.items():
                if i not in first and s.output_ids:
                    first[i] = now - arrivals[i]
                if i not in done and s.finished:
                    done[i] = now - arrivals[i]
    outcomes: list[dict | None] = [None] * len(arrivals)
    for i, s in seqs.items():
        right = s.text.strip() == samples[i].answer.strip()
        outcomes[i] = {"correct": right, "ttft": first[i]}
    answered = list(seqs)
    correct = sum(o["correct"] for o in outcomes if o)
    ttft = sorted(first[i] for i in answered)
    window = arrivals[-1]
    stats = engine.stats()
    kept = [s.kept_at_admission / sum(s.image.visual_tokens) for s in seqs.values()]
    end = [s.cross_tokens / sum(s.image.visual_tokens) for s in seqs.values()]  # after any shed
    floor = [s.kept_at_admission == s.image.floor_tokens for s in seqs.values()]  # elastic admitted at its floor
    return {"accuracy": round(correct / max(len(answered), 1), 4), "answered": len(answered),
            "accuracy_all": round(correct / len(arrivals), 4),  # refusals count as wrong
            "goodput": round(sum(good(o, args.slo_ttft_s) for o in outcomes) / window, 3),
            # the same at other SLOs: how much the verdict hangs on the one stated
            "goodput_at_slo": {str(slo): round(sum(good(o, slo) for o in outcomes) / window, 3) for slo in slos(args)},
            "ttft_p50_s": round(_pct(ttft, 50), 4), "ttft_p99_s": round(_pct(ttft, 99), 4),
            "completion_p99_s": round(_pct(sorted(done.values()), 99), 4),
            "refused": refused, "preempted": stats.preemptions, "shed": stats.sheds, "shed_tokens": stats.shed_tokens,
            "kept_fraction_mean": round(statistics.mean(kept), 4),
            "kept_fraction_end_mean": round(statistics.mean(end), 4),
            "at_ceiling": round(sum(k >= 1.0 for k in kept) / len(kept), 4),  # admitted untrimmed (elastic's ceiling)
            "at_floor": round(sum(floor) / len(floor), 4),
            "pressure_mean": round(statistics.mean(pressures), 3) if pressures else None,
            "steps": steps, "simulated_s": round(now, 3)}, outcomes


def slos(args) -> list[float]:
    return sorted({*SLOS, args.slo_ttft_s})


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]

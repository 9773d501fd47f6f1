"""The report: summary JSON, the BENCHMARKS.md section between the e2e markers, and the plot."""

from pathlib import Path

from loadtests.bench_e2e.constants import HF, MARKERS, SYSTEMS, TARGETS
from loadtests.bench_e2e.locust_runs import saturated


def summarize(sweeps: dict, hf_points: list[dict], hf_info: dict, meta: dict) -> dict:
    """Peak (saturation) points per system and the target ratios."""
    systems = {**sweeps, HF: hf_points}
    peak = {s: max(ps, key=lambda p: p["output_tokens_per_s"]) for s, ps in systems.items() if ps}
    tput = {s: p["output_tokens_per_s"] for s, p in peak.items()}
    ratios = {f"trimmed_vs_{other}": tput["trimmed"] / tput[other]
              for other in ("untrimmed", HF) if {"trimmed", other} <= tput.keys()}
    checks = {f"{k} >= {TARGETS[k]}": v >= TARGETS[k] for k, v in ratios.items()}
    if {"trimmed", "untrimmed"} <= peak.keys():
        checks["mean decode batch trimmed > untrimmed"] = (peak["trimmed"]["mean_decode_batch"]
                                                           > peak["untrimmed"]["mean_decode_batch"])
    checks["0 failures"] = all(p.get("failures", 0) == 0 for ps in systems.values() for p in ps)
    misses = [f"{k} is {v:.2f}x, {100 * (1 - v / TARGETS[k]):.0f}% short of {TARGETS[k]}x"
              for k, v in ratios.items() if v < TARGETS[k]]
    return {**meta, "hf": hf_info, "points": [p for ps in systems.values() for p in ps],
            "saturation": {s: {"users": p["users"], "output_tokens_per_s": p["output_tokens_per_s"],
                               "mean_decode_batch": p["mean_decode_batch"],
                               # a Serve sweep that ended still rising would have gone higher with more users
                               "saturated": s == HF or saturated(systems[s], meta.get("saturation_gain", 0.05))}
                           for s, p in peak.items()},
            "ratios": {k: round(v, 3) for k, v in ratios.items()}, "targets_met": checks, "misses": misses}


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(result: dict, plot_rel: str) -> str:
    m = result
    lines = [
        MARKERS[0],
        "## End to end: the Serve app under locust vs HF generate",
        "",
        *([m["note"], ""] if m.get("note") else []),
        *(["```bash", m["command"], "```", ""] if m.get("command") else []),
        f"`crosstrim bench e2e` ({m['date']}, {m['wall_s']:.0f} s): configs/bench.yaml on a local Ray with "
        f"{m['cpus']} CPU cores, bench model preset (random 142M mllama, one 4-tile image = 4,100 visual tokens "
        f"per request, fp32), streaming chat requests of exactly {m['max_tokens']} output tokens from locust "
        f"(closed loop: users = concurrent requests), {m['point_s']} s per point, rates over its last "
        f"{m['point_s'] - m['warmup_s'] - 1} s. One app and one KV budget ({m['kv_budget_bytes'] / 2**20:.0f} MiB) "
        f"for trimmed (the default policy, topk_union k_ratio 0.15) and untrimmed (`trim: {{enabled: false}}`) "
        f"requests; HF `generate` runs static batches of the same requests in one process (both cores), "
        f"batch sizes up to the {m['hf']['max_batch']} whose KV fits that budget, with "
        f"{m['hf']['torch_threads']} torch thread(s) (its faster setting here: batch-1 ms/token by threads "
        f"{m['hf']['itl_ms_batch1_by_threads']}; every replica of the app runs one). Other processes on the machine "
        f"used up to {max(p.get('other_cores', 0) for p in m['points']):.2f} cores during a measurement.",
        "",
        "| system | users | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | failures "
        "| mean decode batch | cross K/V held / request MiB | shipped / request MiB | other processes' cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in m["points"]:
        lines.append(f"| {p['system']} | {p['users']} | {_fmt(p['requests_per_s'], 2)} | "
                     f"{_fmt(p['output_tokens_per_s'])} | {_fmt(p['ttft_p50_ms'], 0)} | {_fmt(p['ttft_p99_ms'], 0)} | "
                     f"{_fmt(p['itl_p50_ms'], 0)} | {p['failures']} | {_fmt(p['mean_decode_batch'], 2)} | "
                     f"{_fmt(p['cross_kv_mib_per_request'])} | {_fmt(p['shipped_mib_per_request'])} | "
                     f"{_fmt(p.get('other_cores'), 2)} |")
    lines += ["", "At saturation (each system's best point): " + ", ".join(
        f"{s} {v['output_tokens_per_s']:.1f} tok/s at {v['users']} users (decode batch {v['mean_decode_batch']}"
        + ("" if v.get("saturated", True) else "; the sweep ended still rising") + ")"
        for s, v in m["saturation"].items()) + ".",
        "Ratios: " + ", ".join(f"{k} **{v:.2f}x** (target {TARGETS[k]}x)" for k, v in m["ratios"].items()) + ".",
        "Targets: " + ", ".join(f"{k}: {'met' if ok else '**missed**'}" for k, ok in m["targets_met"].items()) + "."]
    if m["misses"]:
        lines += ["Missed: " + "; ".join(m["misses"]) + "."]
    lines += profile_lines(m)
    lines += ["", f"![throughput and p99 TTFT against users]({plot_rel})", MARKERS[1]]
    return "\n".join(lines)


def profile_lines(m: dict) -> list[str]:
    """Where a request's time goes at each system's saturation point: CPU per request by replica."""
    rows = []
    for s in SYSTEMS:
        sat = m["saturation"].get(s)
        if not sat:
            continue
        p = next(p for p in m["points"] if p["system"] == s and p["users"] == sat["users"])
        cpu = p.get("cpu_ms_per_request", {})
        step = p.get("decoder_cpu_ms_per_step")
        per_row = step / p["mean_decode_batch"] if step and p["mean_decode_batch"] else None
        rows.append(f"| {s} | {_fmt(cpu.get('Ingress'), 0)} | {_fmt(cpu.get('VisionEncoder'), 0)} | "
                    f"{_fmt(cpu.get('Trimmer'), 0)} | {_fmt(cpu.get('DecoderPool'), 0)} | "
                    f"{_fmt(cpu.get('locust'), 0)} | "
                    f"{_fmt(p.get('hop_ms_mean'))} | {_fmt(step)} | {_fmt(per_row)} | "
                    f"{_fmt(p.get('machine_busy_cores'), 2)} | {_fmt(p.get('other_cores'), 2)} |")
    if not rows:
        return []
    return ["", "Profile at saturation: CPU ms per request by process over the window; the trimmer -> decoder hop "
                "as the decoder saw it; the decoder's CPU ms per engine step (prefills included) and per decoded row:",
            "", "| system | ingress | encoder | trimmer | decoder | locust | hop ms | decoder step ms | step ms / row "
            "| machine busy cores | other processes' cores |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows]


def write_markdown(path: Path, section: str) -> None:
    """Replace the e2e section between its markers; keep every other section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = MARKERS
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, style in (("trimmed", "o-"), ("untrimmed", "s-"), (HF, "^--")):
        ps = sorted((p for p in result["points"] if p["system"] == system), key=lambda p: p["users"])
        if not ps:
            continue
        users = [p["users"] for p in ps]
        tput.plot(users, [p["output_tokens_per_s"] for p in ps], style, label=system)
        ttft.plot(users, [p["ttft_p99_ms"] or float("nan") for p in ps], style, label=system)
    tput.set(xlabel="users (concurrent requests; HF: static batch size)", ylabel="output tokens/s",
             title="throughput")
    ttft.set(xlabel="users (concurrent requests; HF: static batch size)", ylabel="p99 TTFT (ms)",
             title="time to first token", yscale="log")
    for ax in (tput, ttft):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"crosstrim bench e2e: bench model, {result['max_tokens']} output tokens, "
                 f"KV budget {result['kv_budget_bytes'] / 2**20:.0f} MiB, {result['cpus']} CPU cores")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The locust driver: start and stop a headless run, read its CSVs, rates over a window, when a sweep saturates."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

from loadtests.bench_e2e.constants import (
    LOCUSTFILE,
    PROMPT,
    ROOT,
    SYSTEMS,
    TILES,
)


def start_locust(url: str, prefix: Path, system: str, users: int, args) -> subprocess.Popen:
    ramp_s = min(5.0, args.warmup_s / 2)  # staggered arrivals; stats reset once all users run
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
           "-r", f"{max(users / ramp_s, 1.0):.3f}", "-t", f"{args.point_s}s", "--host", url,
           "--csv", str(prefix), "--csv-full-history", "--only-summary", "--reset-stats", "--stop-timeout", "0",
           "--loglevel", "WARNING", "--trim", SYSTEMS[system], "--image-mix", str(TILES), "--tile-px", "448",
           "--prompt", PROMPT, "--max-tokens", str(args.max_tokens), "--ignore-eos"]
    with open(f"{prefix}.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def stop_process_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def history_counts(prefix: Path, name: str) -> list[tuple[int, int]]:
    """(unix second, requests completed since the stats reset) from locust's per-second history."""
    rows = []
    with open(f"{prefix}_stats_history.csv") as f:
        for row in csv.DictReader(f):
            if row["Name"] == name:
                rows.append((int(row["Timestamp"]), int(row["Total Request Count"])))
    return rows


def count_at(history: list[tuple[int, int]], t: float) -> tuple[int, int]:
    """The last history row at or before t (the first row if none)."""
    before = [row for row in history if row[0] <= t]
    return before[-1] if before else (history[0] if history else (int(t), 0))


def window_rates(a: dict, b: dict, history: list[tuple[int, int]]) -> dict:
    """Rates between two snapshots: output tokens/s and the decode batch from the decoder's counters, requests/s
    from locust's history, CPU cores used per process and per request."""
    dt = b["time"] - a["time"]
    da, db = a["decoder"], b["decoder"]
    (ta, ca), (tb, cb) = count_at(history, a["time"]), count_at(history, b["time"])
    requests = cb - ca  # completed in the window, by locust's clock
    steps, decode_steps = db["steps"] - da["steps"], db["decode_steps"] - da["decode_steps"]
    cores = {k: (b["cpu"][k] - a["cpu"][k]) / dt for k in b["cpu"] if k in a["cpu"]}
    rps = requests / (tb - ta) if tb > ta else 0.0
    return {
        "window_s": round(dt, 2),
        "requests_per_s": round(rps, 3),
        "output_tokens_per_s": round((db["tokens_generated"] - da["tokens_generated"]) / dt, 2),
        "mean_decode_batch": round((db["decode_rows"] - da["decode_rows"]) / decode_steps, 2) if decode_steps else 0,
        # The engine sleeps when idle, so its busy time per step is its CPU time (one torch thread) per step.
        "decoder_cpu_ms_per_step": round(cores["DecoderPool"] * dt * 1e3 / steps, 1)
        if steps and "DecoderPool" in cores else None,
        "cpu_cores": {k: round(v, 3) for k, v in cores.items()},
        "machine_busy_cores": round((b["machine_busy"] - a["machine_busy"]) / dt, 3),
        "other_cores": round(max(0.0, b["machine_busy"] - a["machine_busy"] - b["ours"] + a["ours"]) / dt, 3),
        "cpu_ms_per_request": {k: round(v / rps * 1e3, 1) for k, v in cores.items()} if rps else {},
    }


def locust_summary(prefix: Path) -> dict:
    """Latencies, failures and per-request KV from locust's stats CSV (everything since the stats reset)."""
    with open(f"{prefix}_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}

    def metric(name: str, column: str = "Average Response Time") -> float | None:
        row = rows.get(("METRIC", name))
        return float(row[column]) if row and int(row["Request Count"]) else None

    def mib(name: str) -> float | None:
        kib = metric(name)
        return round(kib / 1024, 2) if kib is not None else None

    chat = rows.get(("POST", "chat/completions"), {})
    return {
        "requests": int(chat.get("Request Count", 0)),
        "failures": sum(int(r["Failure Count"]) for (kind, name), r in rows.items()
                        if kind != "METRIC" and name != "Aggregated"),
        "ttft_p50_ms": metric("ttft_ms", "50%"), "ttft_p99_ms": metric("ttft_ms", "99%"),
        "itl_p50_ms": metric("itl_ms", "50%"),
        "output_tokens_per_request": metric("output_tokens"),
        "cross_kv_mib_per_request": mib("cross_kv_kib"), "shipped_mib_per_request": mib("shipped_kib"),
        "hop_ms_mean": round(metric("hop_ms"), 1) if metric("hop_ms") is not None else None,
    }


def _point_line(p: dict) -> str:
    return (f"  {p['system']:<11} users {p['users']:>3}: {p['output_tokens_per_s']:>7.1f} tok/s "
            f"{p['requests_per_s']:>6.2f} req/s  batch {p['mean_decode_batch']:>5}  TTFT p50/p99 "
            f"{p.get('ttft_p50_ms')}/{p.get('ttft_p99_ms')} ms  failures {p.get('failures')}")


def saturated(points: list[dict], gain: float, patience: int = 2) -> bool:
    """Output tokens/s stopped improving: each of the last `patience` points is not `gain` faster than the best
    before them (one slow point, say from a burst of other work on the machine, does not end a sweep)."""
    if len(points) < patience + 2:
        return False
    best_before = max(p["output_tokens_per_s"] for p in points[:-patience])
    return all(p["output_tokens_per_s"] < (1 + gain) * best_before for p in points[-patience:])



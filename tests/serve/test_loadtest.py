"""The locust load test against the real Serve app (configs/local.yaml on a local Ray): a clean run records its
metrics, a broken target and malformed streams count as failures; and one point of `crosstrim bench e2e`'s
measurement (locust + decoder counters + replica CPU) and its report, on the same app."""

import csv
import http.server as http_server
import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.helpers import ROOT, decoder_stats
from tests.serve.conftest import APP

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"


METRICS = ("ttft_ms", "itl_ms", "output_chunks", "output_tokens", "cross_kv_kib", "shipped_kib", "hop_ms")


def run_locust(host: str, prefix: Path, *extra: str, users: int = 4, seconds: int = 20) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{seconds}s", "--host", host, "--csv", str(prefix), "--only-summary", "--stop-timeout", "0", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 600, cwd=ROOT)


def stats_rows(prefix: Path) -> dict[tuple[str, str], dict]:
    with open(f"{prefix}_stats.csv") as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}


def failure_messages(prefix: Path) -> str:
    return Path(f"{prefix}_failures.csv").read_text()


@pytest.fixture()
def serve_app(serve_app):
    """The shared app (configs/local.yaml), with a client on it."""
    with httpx.Client(base_url=serve_app.url, timeout=httpx.Timeout(60, read=300)) as client:
        yield SimpleNamespace(url=serve_app.url, http=client, config=serve_app.config)


# ------------------------------------------------------------------------------------------------ the locustfile

def test_locust_run_records_metrics_without_failures(serve_app, tmp_path):
    before = decoder_stats(serve_app.http)
    prefix = tmp_path / "run"
    proc = run_locust(serve_app.url, prefix, "--max-tokens", "8", "--ignore-eos", "--image-mix", "1,2,4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = stats_rows(prefix)
    chat = rows[("POST", "chat/completions")]
    assert int(chat["Request Count"]) > 0 and int(chat["Failure Count"]) == 0, chat
    counts = {m: int(rows[("METRIC", m)]["Request Count"]) for m in METRICS if ("METRIC", m) in rows}
    assert set(counts) == set(METRICS), f"missing metrics: {set(METRICS) - set(counts)}"
    assert all(n > 0 for n in counts.values()), counts
    # One of each per request (the CSV is written once a second, so rows may lag each other by a few requests).
    assert abs(counts["ttft_ms"] - int(chat["Request Count"])) <= 4 * 4, (counts, chat["Request Count"])
    tokens = rows[("METRIC", "output_tokens")]
    assert float(tokens["Average Response Time"]) == 8.0  # ignore_eos: exactly max_tokens, from the usage chunk
    assert 0 < float(rows[("METRIC", "ttft_ms")]["Average Response Time"]) < 60_000
    # Only images were sent, so every request reported the cross-attention K/V it held.
    assert counts["cross_kv_kib"] == counts["output_tokens"]
    # The server generated at least the tokens locust received (more: requests cut off at the end).
    generated = decoder_stats(serve_app.http)["tokens_generated"] - before["tokens_generated"]
    assert generated >= 8 * counts["output_tokens"]


def test_locust_counts_a_broken_target_as_failures(serve_app, tmp_path):
    prefix = tmp_path / "unknown-model"
    proc = run_locust(serve_app.url, prefix, "--model", "no-such-model", "--max-tokens", "4", users=2, seconds=4)
    assert proc.returncode != 0
    chat = stats_rows(prefix)[("POST", "chat/completions")]
    assert int(chat["Failure Count"]) == int(chat["Request Count"]) > 0
    assert "HTTP 404" in failure_messages(prefix)


class BadStreams(http_server.BaseHTTPRequestHandler):
    """An OpenAI look-alike whose 200 streams are broken in turn (and one in five is well formed)."""

    protocol_version = "HTTP/1.1"
    turn = 0
    GOOD = ['{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}',
            '{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}', "[DONE]"]
    STREAMS = [
        GOOD,
        ['{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}'],  # no [DONE]
        ['{"choices":[{"index":0,"delta":{"content":"hi"', "[DONE]"],  # cut JSON
        ['{"error":{"message":"decoder lost","code":500}}', "[DONE]"],  # an error after the 200
        ['{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}', "[DONE]"],  # never finished
    ]

    def do_GET(self):
        self._send("application/json", json.dumps({"data": [{"id": "fake"}]}).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        stream = self.STREAMS[BadStreams.turn % len(self.STREAMS)]
        BadStreams.turn += 1
        self._send("text/event-stream", "".join(f"data: {d}\n\n" for d in stream).encode())

    def _send(self, kind: str, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_locust_counts_malformed_streams_as_failures(tmp_path):
    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), BadStreams)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        prefix = tmp_path / "bad-streams"
        proc = run_locust(f"http://127.0.0.1:{server.server_address[1]}", prefix, "--image-mix", "0",
                          users=1, seconds=3)
    finally:
        server.shutdown()
    assert proc.returncode != 0
    chat = stats_rows(prefix)[("POST", "chat/completions")]
    requests, failures = int(chat["Request Count"]), int(chat["Failure Count"])
    assert requests >= 10 and 0 < failures < requests, chat  # the well-formed one in five passes
    text = failure_messages(prefix)
    for reason in ("ended without data: [DONE]", "bad JSON", "error in stream", "no chunk carried a finish_reason"):
        assert reason in text, f"{reason!r} not among the failures:\n{text}"


# ------------------------------------------------------------------------------------------------ bench e2e

@pytest.mark.slow  # docs/testing.md: its command
def test_bench_e2e_point_and_report(serve_app, tmp_path):
    """One locust point as `crosstrim bench e2e` runs it, an HF generate batch, and the Markdown + plot."""
    from loadtests.bench_e2e.constants import MARKERS, PROMPT, TILES, workload
    from loadtests.bench_e2e.hf_baseline import hf_batch, hf_point
    from loadtests.bench_e2e.probe import Bench
    from loadtests.bench_e2e.report import markdown, plot, summarize, write_markdown
    from pipeline.config import ModelConfig
    from pipeline.model.loader import load_model

    args = SimpleNamespace(point_s=10, warmup_s=4, max_tokens=6, users=[3], saturation_gain=0.05)
    bench = Bench(serve_app.url, APP, args, tmp_path)
    assert {"Ingress", "VisionEncoder", "Trimmer", "DecoderPool"} <= set(bench.replicas)
    point = bench.point("trimmed", 3)
    assert point["locust_exit_code"] == 0 and point["failures"] == 0 and point["requests"] > 0, point
    assert point["output_tokens_per_s"] > 0 and point["requests_per_s"] > 0
    assert 1 <= point["mean_decode_batch"] <= 3 and 1 <= point["peak_running"] <= 3
    assert point["output_tokens_per_request"] == 6
    assert point["ttft_p50_ms"] <= point["ttft_p99_ms"] and point["itl_p50_ms"] is not None
    assert 0 < point["cross_kv_mib_per_request"] < point["shipped_mib_per_request"]  # shipped adds resume state
    assert point["cpu_ms_per_request"]["DecoderPool"] > 0 and point["cpu_ms_per_request"]["Trimmer"] > 0

    loaded = load_model(ModelConfig())
    pngs = workload().image_set(448, 2)[TILES]
    runs = [hf_batch(loaded, pngs, 4)]
    assert runs[0]["complete"] and runs[0]["tokens"] == 8 and len(runs[0]["itl_ms"]) == 3 and runs[0]["ttft_ms"] > 0
    late = hf_batch(loaded, pngs, 4, deadline=0)  # past its deadline: stops, and says so
    assert not late["complete"] and late["tokens"] < 8
    hf = hf_point(2, runs, kv_bytes=2**20)

    meta = {"date": "today", "wall_s": 1.0, "cpus": 2, "max_tokens": 6, "point_s": 10, "warmup_s": 4,
            "kv_budget_bytes": 2**24, "trim": {}, "prompt": PROMPT, "tiles_per_image": 4}
    hf_info = {"max_batch": 2, "torch_threads": 1, "itl_ms_batch1_by_threads": {1: 5.0}}
    result = summarize({"trimmed": [point], "untrimmed": []}, [hf], hf_info, meta)
    assert set(result["ratios"]) == {"trimmed_vs_hf_generate"}
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Decoder\nkept as is\n")
    for _ in range(2):  # the second write replaces the section, once
        write_markdown(md, markdown(result, "docs/e2e.png"))
    text = md.read_text()
    assert text.count(MARKERS[0]) == 1 and "## Decoder\nkept as is" in text
    assert "| trimmed | 3 |" in text and "| hf_generate | 2 |" in text
    plot(result, tmp_path / "e2e.png")
    assert (tmp_path / "e2e.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_e2e_saturation_rule():
    from loadtests.bench_e2e.locust_runs import saturated

    tput = lambda *xs: [{"output_tokens_per_s": x} for x in xs]  # noqa: E731
    assert not saturated(tput(10, 20, 20.5), 0.05)  # too few points to tell
    assert not saturated(tput(10, 20, 30, 40), 0.05)
    assert saturated(tput(10, 20, 20.5, 20.2), 0.05)  # twice under 5% better than the best before: saturated
    assert saturated(tput(10, 30, 25, 28), 0.05)
    assert not saturated(tput(10, 20, 20.5, 25), 0.05)  # one slow point is not saturation

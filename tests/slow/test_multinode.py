"""Two real Ray nodes on loopback serving configs/local-2node.yaml (frontend stages on node A, the decoder pool on
node B): answers equal the in-process pipeline's (as the one-node app's do, tests/serve/test_serve.py), and losing node B
fails fast (in-flight streams end with an error event, new requests get 503 + Retry-After, /health names the stage)
and heals when a decoder node rejoins, with no KV budget leaked. Slow: 67-140 s (two nodes, every replica loading
its model on a shared 2-core machine)."""

import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import image

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(text: str, url: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}],
            "temperature": 0, **fields}


@pytest.fixture(scope="module")
def oracle():
    from pipeline.config import ModelConfig, TrimConfig
    from pipeline.inprocess import Pipeline

    args = yaml.safe_load((ROOT / "configs" / "local-2node.yaml").read_text())["applications"][0]["args"]
    return Pipeline(ModelConfig(**args["model"]), trim=TrimConfig(**args["trim"]))


@pytest.fixture(scope="module")
def two_nodes():
    from loadtests.twonode import TwoNodes

    nodes = TwoNodes()
    try:
        nodes.start()
        url = nodes.deploy()
        with httpx.Client(base_url=url, timeout=60) as http:
            yield nodes, http
    finally:
        nodes.stop()


def stream(http, body: dict, timeout: float) -> tuple[int, list[dict]]:
    """(status, the JSON events of an SSE stream, error events included)."""
    events = []
    with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}, timeout=timeout) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return r.status_code, events


def test_split_placement_answers_like_one_process(two_nodes, oracle):
    from loadtests.twonode import replica_nodes
    from pipeline.engine.sampling import SamplingParams

    nodes, http = two_nodes
    assert replica_nodes("crosstrim", "DecoderPool") == [nodes.node_b.node_id]
    head = nodes.cluster.head_node.node_id
    for stage in ("Ingress", "VisionEncoder", "Trimmer"):
        assert replica_nodes("crosstrim", stage) == [head], stage
    for seed, prompt in ((21, "where is the yellow square?"), (22, "What colour is the circle?")):
        img = image(64, 64, seed)
        r = http.post("/v1/chat/completions", json=chat(prompt, data_url(img), max_tokens=16, return_token_ids=True))
        assert r.status_code == 200, r.text
        want = oracle.generate(prompt, [img], SamplingParams(max_tokens=16))
        ids = want.token_ids[:-1] if want.finish_reason == "stop" else want.token_ids
        assert r.json()["token_ids"] == ids
        assert r.json()["choices"][0]["message"]["content"] == want.text


def test_losing_the_decoder_node_fails_fast_and_heals(two_nodes):
    nodes, http = two_nodes
    url = data_url(image(64, 64, 23))
    inflight = {}

    def long_stream():
        t0 = time.monotonic()
        try:
            inflight["result"] = stream(http, chat("describe it", url, max_tokens=1500, ignore_eos=True), 30)
        except Exception as exc:  # the assertion below shows it
            inflight["result"] = (None, [repr(exc)])
        finally:
            inflight["ended"] = time.monotonic()
            inflight["took"] = inflight["ended"] - t0

    worker = threading.Thread(target=long_stream)
    worker.start()
    deadline = time.monotonic() + 30
    while http.get("/stats").json()["decoder"].get("running", 0) == 0:  # the stream is being decoded
        assert time.monotonic() < deadline and worker.is_alive(), inflight
        time.sleep(0.1)
    killed = time.monotonic()
    nodes.kill_decoder_node()

    # In flight: the stream ends within seconds with an error event (its 200 header was already sent).
    worker.join(15)
    assert not worker.is_alive(), "the in-flight stream did not end"
    status, events = inflight["result"]
    print(f"in-flight stream ended {inflight['ended'] - killed:.2f}s after the kill")
    assert inflight["ended"] - killed < 10
    # An error event, then the choice's last chunk with finish_reason "error" (OpenAI clients see the end).
    assert status == 200 and "error" in events[-2], events[-3:]
    assert events[-2]["error"]["code"] == 503
    assert events[-1]["choices"][0]["finish_reason"] == "error", events[-1]

    # During the outage: an answer within 10 s, a 503 with Retry-After naming the stage; /health says which.
    time.sleep(2)
    for body in (chat("where is the yellow square?", url, max_tokens=8),
                 {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}):
        t0 = time.monotonic()
        r = http.post("/v1/chat/completions", json=body, timeout=10)
        print(f"request during the outage: {r.status_code} in {time.monotonic() - t0:.2f}s")
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert "DecoderPool" in r.json()["error"]["message"]
    health = http.get("/health", timeout=10)
    assert health.status_code == 503 and "DecoderPool" in health.json()["error"]["message"]

    # The node rejoins: service resumes within 60 s without touching the head, and no KV budget is held.
    rejoined = time.monotonic()
    nodes.add_decoder_node()
    while True:
        r = http.post("/v1/chat/completions", json=chat("where is the yellow square?", url, max_tokens=8))
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text
        assert time.monotonic() - rejoined < 60, "no answer 60 s after the node rejoined"
        time.sleep(0.5)
    print(f"served again {time.monotonic() - rejoined:.1f}s after the node rejoined")
    assert http.get("/health").status_code == 200
    stats = http.get("/stats").json()["decoder"]
    assert stats["replicas"] == 1 and stats["kv_used_bytes"] == 0 and stats["running"] == 0, stats

"""`crosstrim batch` on an OpenAI batch file (s3:// JSONL in, JSONL out) with bad lines mixed in: one output line per
input line in order, custom_ids kept, and every line that reaches a body answered as the Serve app's endpoint answers
the same body: the same greedy completion, or the same 400/404 error."""

import json

import boto3
import httpx
import pytest
import yaml

from pipeline.cli import main
from tests.helpers import data_url, image, png
from tests.serve.conftest import BUCKET

MODEL = "crosstrim-tiny"


def chat(text: str, *urls: str, **fields) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return {"model": MODEL, "messages": [{"role": "user", "content": parts}], "temperature": 0, **fields}


def line(custom_id, url: str, body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


HOP = ("hop_ms", "ship", "shipped_bytes", "shipped_cross_bytes")


def comparable(body: dict) -> tuple[dict, list[float]]:
    """A response body without what differs between two calls (ids, timestamps, the trimmer -> decoder hop's figures:
    the batch job has no hop and the shared app may ship features), and its log-probabilities apart: equal within
    1e-4, as float sums in another batch composition give them."""
    out = {k: v for k, v in body.items() if k not in ("id", "created")}
    if out.get("trim"):
        out["trim"] = {k: v for k, v in out["trim"].items() if k not in HOP}
    floats = []

    def split(x):
        if isinstance(x, float):
            floats.append(x)
            return "<float>"
        if isinstance(x, dict):
            return {k: split(v) for k, v in x.items()}
        return [split(v) for v in x] if isinstance(x, list) else x

    return split(out), floats


@pytest.fixture()
def aws_env(monkeypatch, s3_endpoint):
    for key, value in dict(AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                           AWS_DEFAULT_REGION="us-east-1").items():
        monkeypatch.setenv(key, value)
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


def test_openai_batch_file_answers_each_line_as_the_endpoints_do(serve_app, aws_env, images, tmp_path):
    CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
    picture = data_url(png(image(90, 50, 31)))
    good = {
        "image": (CHAT, chat("what is the shape at row one column two?", picture, max_tokens=6)),
        "s3-image": (CHAT, chat("what colour is it?", f"s3://{BUCKET}/img/shape.png", max_tokens=5, logprobs=True,
                                top_logprobs=2)),
        "text-n2-default-max": (CHAT, {**chat("hello"), "n": 2, "trim": {"enabled": False}}),  # no max_tokens
        "json": (CHAT, chat("a JSON object please", max_tokens=8, response_format={"type": "json_object"})),
        "completion": (TEXT, {"model": MODEL, "prompt": "once upon a", "max_tokens": 5, "temperature": 0,
                              "logprobs": 2}),
        "no-messages": (CHAT, {"model": MODEL, "messages": []}),  # 400: the body's schema
        "other-model": (CHAT, {**chat("hi", max_tokens=2), "model": "gpt-4o"}),  # 404
        "ftp-image": (CHAT, chat("hi", "ftp://example.com/a.png", max_tokens=2)),  # 400 from the image fetcher
        "bad-temperature": (TEXT, {"prompt": "x", "temperature": 1e-7}),  # 400 from the sampler's checks
    }
    text = [line(cid, url, body) for cid, (url, body) in good.items()]
    text[2:2] = ["{this is not json",  # no custom_id to keep: an error line
                 line("embeddings", "/v1/embeddings", {"input": "x"}),
                 json.dumps({"custom_id": "get", "method": "GET", "url": CHAT, "body": {}}),
                 line("streamed", CHAT, chat("hi", max_tokens=2, stream=True)),
                 "[1, 2]",
                 line("two-prompts", TEXT, {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2})]
    aws_env.put_object(Bucket=BUCKET, Key="batch/in.jsonl", Body=("\n".join(text) + "\n").encode())
    args = serve_app.config["applications"][0]["args"]
    config = tmp_path / "batch.yaml"
    config.write_text(yaml.safe_dump({"model": args["model"], "trim": args["trim"], "engine": args["engine"],
                                      "sampling": {"max_tokens": args["default_max_tokens"]}}))
    out = tmp_path / "out.jsonl"
    assert main(["batch", "--config", str(config), "--input", f"s3://{BUCKET}/batch/in.jsonl",
                 "--output", str(out)]) == 0

    rows = [json.loads(r) for r in out.read_text().splitlines()]
    assert len(rows) == len(text)
    expected_ids = [json.loads(t).get("custom_id") if t.startswith("{\"") else None for t in text]
    assert [r["custom_id"] for r in rows] == expected_ids
    assert len({r["id"] for r in rows}) == len(rows) and all(r["id"].startswith("batch_req_") for r in rows)
    by_id = {r["custom_id"]: r for r in rows if r["custom_id"] is not None}
    for r in (rows[2], rows[6]):  # not JSON; JSON but not an object
        assert r["response"] is None and r["error"]["code"] in ("invalid_json", "invalid_request"), r
    for cid, what in (("embeddings", "url"), ("get", "method")):
        assert by_id[cid]["response"] is None and what in by_id[cid]["error"]["message"]
    streamed = by_id["streamed"]["response"]
    assert streamed["status_code"] == 400 and "stream" in streamed["body"]["error"]["message"]
    two = by_id["two-prompts"]["response"]  # one prompt a line: the endpoint's several prompts are several requests
    assert two["status_code"] == 400 and two["body"]["error"]["param"] == "prompt", two

    with httpx.Client(base_url=serve_app.url, timeout=300) as http:
        for cid, (url, body) in good.items():
            got = by_id[cid]
            assert got["error"] is None, got
            want = http.post(url, json=body)
            assert got["response"]["status_code"] == want.status_code, (cid, got, want.text)
            (got_body, got_floats), (want_body, want_floats) = comparable(got["response"]["body"]), comparable(want.json())
            assert got_body == want_body, cid  # the same tokens, text, finish reasons, usage, trim; or the same error
            assert got_floats == pytest.approx(want_floats, abs=1e-4), cid
            if want.status_code == 200:
                assert got["response"]["request_id"] == got["response"]["body"]["id"]
    assert by_id["image"]["response"]["body"]["trim"]["kept_tokens"] < by_id["image"]["response"]["body"]["trim"][
        "visual_tokens"]
    default = by_id["text-n2-default-max"]["response"]["body"]
    assert [c["index"] for c in default["choices"]] == [0, 1]
    assert default["usage"]["completion_tokens"] > 0

"""The ingress's response side without Serve: one Accumulator fed by typed decoder items renders the same n
completions as a JSON body and as SSE events, and a StageError ends either the way the HTTP contract says."""

import asyncio
import json

import pytest

from deployments.api import ChatCompletionRequest
from deployments.chat import ChatRenderer
from deployments.http_app import ApiError
from deployments.responses import Accumulator, DecoderStream, collect, events
from deployments.stream import StageError, TrimSummary
from pipeline.types import RequestOutput

TRIM = TrimSummary(visual_tokens=130, kept_tokens=49, kept_ratio=0.376923, cross_kv_bytes=10, cross_kv_bytes_full=30,
                   ship="kv", shipped_bytes=40, shipped_cross_bytes=10, hop_ms=1.5)


class FakeItems:
    """A Serve streaming response: async iteration plus cancel()."""

    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class Tokens:
    """TokenBytes' interface over a toy vocabulary: token id i is the text f"t{i}"."""

    def entries(self, rows):
        return [{"token": f"t{r.token_id}", "logprob": r.logprob, "top_logprobs": [list(t) for t in r.top]}
                for r in rows]


def out(index, ids, text, finished=False, reason=None, completion_tokens=0):
    return RequestOutput("r", ids, text, finished, reason, prompt_tokens=7, completion_tokens=completion_tokens,
                         cached_tokens=4, logprobs=[-0.5] * len(ids), top_logprobs=[[(i, -0.5)] for i in ids], index=index)


# Two completions interleaved, as the decoder yields them.
OUTPUTS = [out(0, [1], "a"), out(1, [5], "x"), out(1, [6], "y", True, "stop", 2), out(0, [2, 3], "bc", True, "length", 3)]


def render(n=2, stream=False, **fields):
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=n, stream=stream, **fields)
    return req, ChatRenderer(req, "chatcmpl-1", "m", TRIM, Tokens())


def run_sse(items, req, renderer):
    stream = DecoderStream(FakeItems(items[1:]), items[0], TRIM)
    gaps = []

    async def drain():
        return [e async for e in events(stream, Accumulator(req.n), renderer, gaps.append)]

    lines = asyncio.run(drain())
    assert lines[-1] == "data: [DONE]\n\n" and stream.items.cancelled
    return [json.loads(e.removeprefix("data: ")) for e in lines[:-1]], gaps


def test_json_body_per_index():
    _, renderer = render(logprobs=True, top_logprobs=1, return_token_ids=True)
    stream = DecoderStream(FakeItems(OUTPUTS[1:]), OUTPUTS[0], TRIM)
    body = asyncio.run(collect(stream, Accumulator(2), renderer, retry_after_s=1))
    assert stream.items.cancelled
    assert [c["message"]["content"] for c in body["choices"]] == ["abc", "xy"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    assert [len(c["logprobs"]["content"]) for c in body["choices"]] == [3, 2]
    assert body["choices"][0]["logprobs"]["content"][1] == {"token": "t2", "logprob": -0.5, "top_logprobs": [[2, -0.5]]}
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                             "prompt_tokens_details": {"image_tokens": 130,  # the trim summary's visual tokens
                                                       "cached_tokens": 4}}  # from the prefix cache
    assert body["token_ids"] == [[1, 2, 3], [5, 6]] and body["trim"]["kept_tokens"] == 49


def test_sse_and_json_agree():
    req, renderer = render(stream=True, stream_options={"include_usage": True})
    chunks, gaps = run_sse(OUTPUTS, req, renderer)
    assert len(gaps) == len(OUTPUTS) - 1
    text, reasons = ["", ""], [None, None]
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        text[choice["index"]] += choice["delta"].get("content", "")
        reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
        assert ("trim" in c) == (choice["finish_reason"] is not None)  # the extensions ride on the last chunk
    assert text == ["abc", "xy"] and reasons == ["length", "stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_error_mid_stream():
    """JSON: the request's status; SSE: an error event, then every completion still open ends with "error"."""
    items = [OUTPUTS[0], OUTPUTS[1], OUTPUTS[2], StageError(503, "overloaded")]
    _, renderer = render()
    with pytest.raises(ApiError) as err:
        asyncio.run(collect(DecoderStream(FakeItems(items[1:]), items[0], None), Accumulator(2), renderer, 1))
    assert (err.value.status, err.value.retry_after) == (503, 1)
    req, renderer = render(stream=True)
    chunks, _ = run_sse(items, req, renderer)
    error = next(i for i, c in enumerate(chunks) if "error" in c)
    assert chunks[error]["error"]["code"] == 503
    assert [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks[error + 1:]] == [(0, "error")]


def test_lost_replica_mid_stream_is_a_stage_error():
    from ray.exceptions import RayActorError

    stream = DecoderStream(FakeItems([RayActorError()]), OUTPUTS[0], None)

    async def drain():
        return [i async for i in stream]

    first, error = asyncio.run(drain())
    assert first is OUTPUTS[0] and isinstance(error, StageError) and error.status == 503 and error.retryable


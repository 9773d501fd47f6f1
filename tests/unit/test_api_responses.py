"""The new response shapes without Serve: tool calls in a chat body and streamed as one tool_calls delta, text that
only looks like a call streamed as text, usage on every chunk, and text completions with the legacy logprobs."""

import asyncio
import json

from deployments.api import CompletionRequest
from deployments.completions import TextRenderer
from deployments.responses import Accumulator, DecoderStream, collect, events
from tests.unit.test_responses import TRIM, FakeItems, Tokens, out, render

TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
CALL = '{"name": "get_time", "parameters": {"zone": "UTC"}}'


def _outputs(text: str) -> list:
    """`text` in three decoder outputs of completion 0, the last finishing with "stop"."""
    cut = [0, len(text) // 3, 2 * len(text) // 3, len(text)]
    return [out(0, [i], text[a:b], i == 2, "stop" if i == 2 else None, i + 1) for i, (a, b) in
            enumerate(zip(cut, cut[1:]))]


def _sse(renderer, req, outputs) -> list[dict]:
    stream = DecoderStream(FakeItems(outputs[1:]), outputs[0], TRIM)

    async def run():
        return [line async for line in events(stream, Accumulator(req.n), renderer)]

    return [json.loads(e[6:]) for e in asyncio.run(run()) if e.startswith("data: {")]


def test_a_tool_call_in_the_body_and_in_the_stream():
    for choice in ("auto", "required"):
        req, renderer = render(n=1, tools=TOOLS, tool_choice=choice)
        body = asyncio.run(collect(DecoderStream(FakeItems(_outputs(CALL)[1:]), _outputs(CALL)[0], TRIM),
                                   Accumulator(1), renderer, 1))
        (c,) = body["choices"]
        assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None
        (call,) = c["message"]["tool_calls"]
        assert call["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'} and call["type"] == "function"
        req, renderer = render(n=1, stream=True, tools=TOOLS, tool_choice=choice)
        chunks = _sse(renderer, req, _outputs(CALL))
        deltas = [ch["choices"][0] for ch in chunks[1:]]
        assert len(deltas) == 1 and deltas[0]["finish_reason"] == "tool_calls"  # held, then one delta
        assert deltas[0]["delta"]["tool_calls"][0]["function"]["name"] == "get_time"


def test_text_that_is_not_a_call_streams_as_text():
    req, renderer = render(n=1, stream=True, tools=TOOLS, tool_choice="auto")
    chunks = _sse(renderer, req, _outputs("It is noon in Paris."))
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    assert text == "It is noon in Paris." and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(chunks) == 4  # the role chunk and one per output: nothing held once it is text
    req, renderer = render(n=1, stream=True, tools=TOOLS, tool_choice="none")
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in _sse(renderer, req, _outputs(CALL))) == CALL


def test_continuous_usage_on_every_chunk():
    req, renderer = render(n=1, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = _sse(renderer, req, _outputs("abcdef"))
    usages = [ch["usage"]["completion_tokens"] for ch in chunks if "usage" in ch]
    assert usages == [1, 2, 3, 3]  # each output's count, then the closing usage chunk
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"image_tokens": TRIM.visual_tokens, "cached_tokens": 4}


def test_text_completion_body_and_stream():
    req = CompletionRequest(prompt="hi", logprobs=1)
    renderer = TextRenderer(req, "cmpl-1", "m", Tokens())
    renderer.token_bytes = lambda t: {"token": f"t{t}"}  # the legacy shape reads only the token's text
    outputs = _outputs("t0t1t2")
    body = asyncio.run(collect(DecoderStream(FakeItems(outputs[1:]), outputs[0], None), Accumulator(1), renderer, 1))
    (c,) = body["choices"]
    assert body["object"] == "text_completion" and c["text"] == "t0t1t2" and c["finish_reason"] == "stop"
    assert c["logprobs"]["tokens"] == ["t0", "t1", "t2"] and c["logprobs"]["text_offset"] == [0, 2, 4]
    assert c["logprobs"]["top_logprobs"] == [{"t0": -0.5}, {"t1": -0.5}, {"t2": -0.5}]
    stream_req = CompletionRequest(prompt=[1, 2], stream=True, stream_options={"include_usage": True})
    renderer = TextRenderer(stream_req, "cmpl-1", "m", Tokens())
    chunks = _sse(renderer, stream_req, _outputs("t0t1t2"))
    assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == "t0t1t2"
    assert chunks[-1]["usage"]["completion_tokens"] == 3

"""The Responses API without Serve: a request translated into the chat request that computes it (messages, images,
instructions, function_call history, tools, text.format, logprobs), the stateless refusals, and the `response` body
and SSE events validated by the openai SDK's own models (text, a cut-off text, a tool call, an error mid-stream)."""

import asyncio
import json
import re

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from deployments.api import ChatCompletionRequest
from deployments.constraints import structured_output, tool_dicts
from deployments.responses import Accumulator, DecoderStream, collect, events
from deployments.responses_api import ResponsesRequest, to_chat
from deployments.responses_renderer import ResponsesRenderer
from deployments.stream import StageError
from pipeline.errors import InvalidRequest
from tests.unit.test_responses import TRIM, FakeItems, out

EVENT = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


class Tokens:
    """TokenBytes over a toy vocabulary: token id i is the text f"t{i}"."""

    def entries(self, rows):
        return [{"token": f"t{r.token_id}", "bytes": list(f"t{r.token_id}".encode()), "logprob": r.logprob,
                 "top_logprobs": [{"token": f"t{i}", "bytes": list(f"t{i}".encode()), "logprob": v} for i, v in r.top]}
                for r in rows]


def chat(**body) -> ChatCompletionRequest:
    return to_chat(ResponsesRequest.model_validate(body))


# ---------------------------------------------------------------- the request

def test_input_instructions_and_sampling_become_the_chat_request():
    c = chat(input="hi", instructions="be brief", max_output_tokens=5, temperature=0.5, top_p=0.9, seed=3,
             trim={"k_ratio": 0.3}, store=False, metadata={"a": "b"}, user="u", top_k=4, ignore_eos=True)
    assert [m.model_dump(exclude_none=True) for m in c.messages] == [{"role": "system", "content": "be brief"},
                                                                      {"role": "user", "content": "hi"}]
    assert (c.max_completion_tokens, c.temperature, c.top_p, c.seed, c.top_k, c.ignore_eos, c.n) == (
        5, 0.5, 0.9, 3, 4, True, 1)
    assert c.trim.k_ratio == 0.3 and not c.logprobs and c.response_format is None
    image = {"type": "input_image", "image_url": "s3://bucket/a.png", "detail": "high"}
    c = chat(input=[{"role": "user", "content": [image, {"type": "input_text", "text": "what is it?"}]},
                    {"type": "message", "role": "assistant", "content": [
                        {"type": "output_text", "text": "a square", "annotations": []}]},
                    {"role": "developer", "content": "answer in French"}])
    user, assistant, developer = (m.model_dump(exclude_none=True) for m in c.messages)
    assert user["content"] == [{"type": "image_url", "image_url": {"url": "s3://bucket/a.png"}},
                               {"type": "text", "text": "what is it?"}]
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": "a square"}]}
    assert developer["role"] == "developer"  # rendered as system, as chat renders it


def test_function_call_history_tools_and_tool_choice():
    c = chat(input=[{"role": "user", "content": "weather in Oslo and Paris?"},
                    {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                    {"type": "function_call_output", "call_id": "c1", "output": "rain"},
                    {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "sun"}]}],
             tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"})
    roles = [m.role for m in c.messages]
    assert roles == ["user", "assistant", "tool", "tool"]
    assert [t.id for t in c.messages[1].tool_calls] == ["c1", "c2"] and c.messages[3].content == "sun"
    assert tool_dicts(c) == [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    forced = structured_output(c)
    assert forced is not None and forced == structured_output(ChatCompletionRequest(
        messages=[{"role": "user", "content": "x"}], tools=tool_dicts(c),
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert chat(input="x", tools=[WEATHER], tool_choice="none").tool_choice == "none"
    with pytest.raises(InvalidRequest, match="tool_choice names 'other', which is not in tools"):
        chat(input="x", tools=[WEATHER], tool_choice={"type": "function", "name": "other"})


def test_text_format_goes_through_the_grammar_path():
    def spec(fmt):
        return structured_output(chat(input="x", text={"format": fmt}))

    assert spec({"type": "text"}) is None
    assert spec({"type": "json_object"}).kind == "json_object"
    js = spec({"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True})
    assert js == structured_output(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}))
    with pytest.raises(InvalidRequest, match="invalid json schema"):
        spec({"type": "json_schema", "name": "bad", "schema": {"type": "object", "properties": 3}})
    c = chat(input="x", include=["message.output_text.logprobs"], top_logprobs=2)
    assert c.logprobs and c.top_logprobs == 2


@pytest.mark.parametrize("body, message", [
    ({"store": True}, "store=True is not supported (this server keeps no state"),
    ({"previous_response_id": "resp_1"}, "previous_response_id is not supported (this server keeps no state"),
    ({"conversation": "conv_1"}, "conversation is not supported (this server keeps no state"),
    ({"background": True}, "background=True is not supported"),
    ({"tools": [{"type": "web_search"}]}, "tools of type 'web_search' are not supported"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice values of type 'file_search' are not supported"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input items of type 'item_reference' are not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "content parts of type 'input_file' are not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "file_id is not supported"),
    ({"include": ["reasoning.encrypted_content"]}, "include ['reasoning.encrypted_content'] is not supported"),
    ({"text": {"verbosity": "low"}}, "verbosity is not supported"),
    ({"truncation": "auto"}, "truncation='auto' is not supported"),
    ({"max_tokens": 3}, "Extra inputs are not permitted"),  # chat's name, not the Responses API's
    ({"input": ""}, "the input is empty"),
])
def test_what_is_refused_says_why(body, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        ResponsesRequest.model_validate({"input": "hi", **body})


def test_fields_clients_send_are_accepted():
    ResponsesRequest.model_validate({
        "input": "hi", "store": False, "background": False, "truncation": "disabled", "parallel_tool_calls": True,
        "metadata": {"a": "b"}, "service_tier": "auto", "reasoning": {"effort": "low"}, "stream_options": {
            "include_obfuscation": False}, "prompt_cache_key": "k", "safety_identifier": "s", "max_tool_calls": 2})


# ---------------------------------------------------------------- the response

def render(**body):
    req = ResponsesRequest.model_validate({"input": "hi", **body})
    c = to_chat(req)
    return req, ResponsesRenderer(req, c, "resp_1", "m", TRIM, Tokens())


def outputs(text: str, reason: str = "stop") -> list:
    """`text` in three decoder outputs, the last finishing with `reason`."""
    cut = [0, len(text) // 3, 2 * len(text) // 3, len(text)]
    return [out(0, [i], text[a:b], i == 2, reason if i == 2 else None, i + 1) for i, (a, b) in
            enumerate(zip(cut, cut[1:]))]


def body_of(renderer, items) -> dict:
    stream = DecoderStream(FakeItems(items[1:]), items[0], TRIM)
    return asyncio.run(collect(stream, Accumulator(1), renderer, 1))


def sse(renderer, items) -> list[dict]:
    """The SSE events, each checked by the SDK's own event models; `event:` names the data's type."""
    stream = DecoderStream(FakeItems(items[1:]), items[0], TRIM)

    async def drain():
        return [e async for e in events(stream, Accumulator(1), renderer)]

    parsed = []
    for frame in asyncio.run(drain()):
        name, data = frame.removesuffix("\n\n").split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        EVENT.validate_python(event)
        parsed.append(event)
    assert [e["sequence_number"] for e in parsed] == list(range(len(parsed)))
    return parsed


def test_text_body_and_stream_parse_with_the_sdk():
    _, renderer = render(include=["message.output_text.logprobs"], return_token_ids=True, instructions="be brief")
    body = body_of(renderer, outputs("It is a square."))
    r = Response.model_validate(body)
    assert r.output_text == "It is a square." and r.status == "completed" and r.instructions == "be brief"
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (7, 3, 10)
    assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    assert [lp.token for lp in r.output[0].content[0].logprobs] == ["t0", "t1", "t2"]
    assert body["trim"]["kept_tokens"] == 49 and body["token_ids"] == [0, 1, 2] and body["store"] is False

    _, renderer = render(stream=True)
    evs = sse(renderer, outputs("It is a square."))
    assert [e["type"] for e in evs] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 3, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta") == "It is a square."
    final = Response.model_validate(evs[-1]["response"])
    assert final.output_text == "It is a square." and final.usage.output_tokens == 3
    assert final.output[0].id == evs[2]["item"]["id"] == evs[-2]["item"]["id"]  # one item, one id


def test_a_cut_off_text_is_incomplete():
    _, renderer = render(max_output_tokens=3)
    r = Response.model_validate(body_of(renderer, outputs("It is a", reason="length")))
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"
    _, renderer = render(max_output_tokens=3, stream=True)
    assert sse(renderer, outputs("It is a", reason="length"))[-1]["type"] == "response.incomplete"


CALL = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'


def test_a_tool_call_is_a_function_call_item():
    for choice in ("auto", "required", {"type": "function", "name": "get_weather"}):
        _, renderer = render(tools=[WEATHER], tool_choice=choice)
        r = Response.model_validate(body_of(renderer, outputs(CALL)))
        (call,) = r.output
        assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_weather", {"city": "Oslo"})
        assert call.call_id.startswith("call_") and r.output_text == ""
        _, renderer = render(tools=[WEATHER], tool_choice=choice, stream=True)
        evs = sse(renderer, outputs(CALL))
        assert [e["type"] for e in evs[2:]] == [  # held until it is known to be a call, then sent whole
            "response.output_item.added", "response.function_call_arguments.delta",
            "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
        assert evs[-1]["response"]["output"][0]["call_id"] == evs[-2]["item"]["call_id"]
    # Text that only looks like it might be a call is streamed once it is known to be text.
    _, renderer = render(tools=[WEATHER], stream=True)
    evs = sse(renderer, outputs("It rains in Oslo."))
    assert "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta") == "It rains in Oslo."
    assert Response.model_validate(evs[-1]["response"]).output_text == "It rains in Oslo."


def test_an_error_mid_stream_fails_the_response():
    items = outputs("It is a square.")[:2] + [StageError(503, "overloaded")]
    _, renderer = render(stream=True)
    evs = sse(renderer, items)
    error, failed = evs[-2:]
    assert error["type"] == "error" and error["message"] == "overloaded"
    r = Response.model_validate(failed["response"])
    assert failed["type"] == "response.failed" and r.status == "failed" and r.error.code == "server_error"
    assert r.output_text == "It is a sq"  # the text sent before the failure

"""Tools through the `openai` SDK against the Serve app: tool_choice required and named forced through the grammar
into tool_calls with valid JSON arguments (streamed too), tool turns in the conversation, tool_choice none. The
Llama 3.x tool prompt (the functions as indented JSON in the user turn) runs past the tiny model's 1,024-token prompt
limit with two tools, so this module's app allows 2,048 (tests/serve/conftest.py's FEATURES_LONG_PROMPTS)."""

import json

import jsonschema
import openai
import pytest

from tests.helpers import image, png
from tests.serve.conftest import FEATURES_LONG_PROMPTS
from tests.serve.test_openai_api import MODEL, user

pytestmark = pytest.mark.serve_config(**FEATURES_LONG_PROMPTS)  # its 2,048 tokens; shared with test_serve's ship test

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"]}}}


@pytest.fixture()
def client(serve_app):
    return openai.OpenAI(base_url=serve_app.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _args(call, tool) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_forced_tool_calls_parse_into_tool_calls(client):
    msgs = user("weather in Paris for 3 days?", png(image(64, 64, 51)))
    named = {"type": "function", "function": {"name": "get_time"}}
    for i in range(3):
        r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, CLOCK], tool_choice="required",
                                           temperature=1.0, seed=i, max_tokens=160, parallel_tool_calls=False)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        _args(call, WEATHER if call.function.name == "get_weather" else CLOCK)
        r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, CLOCK], tool_choice=named,
                                           temperature=1.0, seed=i, max_tokens=160)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_time" and call.id.startswith("call_")
        _args(call, CLOCK)
    # Streamed: the call arrives as tool_calls deltas, which the SDK accumulates.
    stream = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="required",
                                            temperature=1.0, seed=9, max_tokens=160, stream=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [tc for d in deltas for tc in d.delta.tool_calls or []]
    assert deltas[-1].finish_reason == "tool_calls" and len(calls) == 1
    assert not any(d.delta.content for d in deltas)
    _args(calls[0], WEATHER)


def test_tool_turns_in_the_conversation_and_tool_choice_none(client):
    history = user("weather in Oslo?") + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                       max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")  # auto: the model's text decides

"""The Responses API through the real `openai` SDK's `client.responses.create` against the Serve app: text and an
image (equal to the chat endpoint's greedy answer to the same conversation), structured `text.format`, a function
tool, streaming events, the stateless refusals; and GET /version. Few tokens a request."""

import json
import subprocess

import httpx
import jsonschema
import openai
import pytest

from deployments.version import package_version
from tests.helpers import ROOT, data_url, image, png
from tests.serve.conftest import BUCKET
from tests.serve.test_openai_api import MODEL, SCHEMA

WEATHER = {"type": "function", "name": "get_weather", "description": "the weather in a city",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                          "properties": {"city": {"enum": ["Paris", "Oslo"]}}}}


@pytest.fixture()
def client(serve_app):
    return openai.OpenAI(base_url=serve_app.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def chat_text(client, messages, max_tokens) -> str:
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content


def test_text_and_images_answer_as_chat_does(client):
    r = client.responses.create(model=MODEL, instructions="answer briefly", input="what is the shape?",
                                max_output_tokens=6, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.status in ("completed", "incomplete")
    assert r.output_text == chat_text(client, [{"role": "system", "content": "answer briefly"},
                                               {"role": "user", "content": "what is the shape?"}], 6)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens and 0 < r.usage.output_tokens <= 6
    picture = data_url(png(image(64, 64, 63)))
    r = client.responses.create(model=MODEL, max_output_tokens=4, temperature=0, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": picture}, {"type": "input_text", "text": "where is the square?"}]}])
    assert r.output_text == chat_text(client, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": picture}}, {"type": "text", "text": "where is the square?"}]}], 4)
    assert r.model_extra["trim"]["visual_tokens"] > r.model_extra["trim"]["kept_tokens"] > 0
    r = client.responses.create(model=MODEL, max_output_tokens=1, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": f"s3://{BUCKET}/img/shape.png"}, {"type": "input_text", "text": "what?"}]}],
        extra_body={"trim": {"enabled": False}})
    assert r.usage.output_tokens == 1 and r.model_extra["trim"]["kept_ratio"] == 1.0


def test_structured_text_format_and_a_function_tool(client):
    fmt = {"type": "json_schema", "name": "shape", "schema": SCHEMA, "strict": True}
    r = client.responses.create(model=MODEL, input="describe the shape", text={"format": fmt}, temperature=1.0,
                                max_output_tokens=48, extra_body={"seed": 1})
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), SCHEMA)
    r = client.responses.create(model=MODEL, input="weather in Paris?", tools=[WEATHER], tool_choice="required",
                                temperature=1.0, max_output_tokens=160, extra_body={"seed": 2})
    assert r.status == "completed", r.output  # the grammar ends the call well before 160 tokens
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    # The call and its output in the next turn's input (no state kept: the client sends the conversation).
    r = client.responses.create(model=MODEL, tools=[WEATHER], tool_choice="none", max_output_tokens=3, input=[
        {"role": "user", "content": "weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert r.output[0].type == "message" and r.usage.output_tokens <= 3


def test_streaming_events(client):
    events = list(client.responses.create(model=MODEL, input="what is the shape?", max_output_tokens=5,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == client.responses.create(model=MODEL, input="what is the shape?",
                                                                max_output_tokens=5, temperature=0).output_text
    assert final.usage.output_tokens == 5 or final.status == "completed"


def test_the_server_keeps_no_state(client):
    for fields in ({"store": True}, {"previous_response_id": "resp_123"}):
        with pytest.raises(openai.BadRequestError, match="keeps no state"):
            client.responses.create(model=MODEL, input="hi", max_output_tokens=1, **fields)
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=1, store=False)
    assert r.store is False
    with pytest.raises(openai.BadRequestError, match="tools of type 'web_search'"):
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}])


def test_version(serve_app):
    v = httpx.get(serve_app.url + "/version", timeout=60).json()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert v == {"version": package_version(), "model": MODEL,
                 "revision": head.stdout.strip() if head.returncode == 0 else None}

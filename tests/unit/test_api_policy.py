"""The field policy (deployments/policy.py) against the openai SDK's own field lists (chat, completions, Responses),
the OpenAPI document and docs/api.md; what each kind of policy does to a request; tools written into the chat and
parsed back."""

import json
import typing

import pytest
from openai.types import completion_create_params as text_params
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionContentPartImageParam,
    ChatCompletionContentPartTextParam,
    ChatCompletionDeveloperMessageParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolMessageParam,
    ChatCompletionUserMessageParam,
)
from openai.types.chat import completion_create_params as chat_params
from openai.types.responses import (
    EasyInputMessageParam,
    FunctionToolParam,
    ResponseFunctionToolCallParam,
    ResponseInputImageParam,
    ResponseInputTextParam,
    ResponseOutputMessageParam,
    ResponseOutputRefusalParam,
    ResponseOutputTextParam,
    ResponseTextConfigParam,
)
from openai.types.responses import response_create_params as responses_params
from openai.types.responses import response_input_param as items
from pydantic import ValidationError

from deployments import api, policy
from deployments.constraints import structured_output
from deployments.preprocess import to_hf_messages
from pipeline.errors import InvalidRequest
from pipeline.model.tools import TOOL_PROMPT, call_schema, parse_tool_calls
from tests.helpers import ROOT, script

USER = [{"role": "user", "content": "hi"}]


def _fields(*typed_dicts) -> set[str]:
    return {name for t in typed_dicts for name in typing.get_type_hints(t)}


def test_every_field_of_the_openai_sdk_has_a_policy():
    assert _fields(chat_params.CompletionCreateParamsBase) - set(policy.CHAT) == set()
    assert _fields(text_params.CompletionCreateParamsBase) - set(policy.COMPLETIONS) == set()
    messages = (ChatCompletionAssistantMessageParam, ChatCompletionDeveloperMessageParam,
                ChatCompletionSystemMessageParam, ChatCompletionToolMessageParam, ChatCompletionUserMessageParam)
    assert _fields(*messages) - set(policy.MESSAGE) == set()
    assert _fields(ChatCompletionContentPartTextParam, ChatCompletionContentPartImageParam) - set(policy.PART) == set()


def test_every_field_of_the_sdks_responses_request_has_a_policy():
    assert _fields(responses_params.ResponseCreateParamsStreaming) - set(policy.RESPONSES) == set()
    assert _fields(EasyInputMessageParam, items.Message, ResponseOutputMessageParam, ResponseFunctionToolCallParam,
                   items.FunctionCallOutput) - set(policy.RESPONSES_ITEM) == set()
    assert _fields(ResponseInputTextParam, ResponseInputImageParam, ResponseOutputTextParam,
                   ResponseOutputRefusalParam) - set(policy.RESPONSES_PART) == set()
    assert _fields(FunctionToolParam) - set(policy.RESPONSES_TOOL) == set()
    assert _fields(ResponseTextConfigParam) - set(policy.RESPONSES_TEXT) == set()


def test_the_openapi_document_and_docs_api_match_the_policy():
    from deployments.ingress import app

    schemas = app.openapi()["components"]["schemas"]
    for model, table in (("ChatCompletionRequest", policy.CHAT), ("CompletionRequest", policy.COMPLETIONS),
                         ("Message", policy.MESSAGE), ("ResponsesRequest", policy.RESPONSES)):
        props = schemas[model]["properties"]
        assert set(table) <= set(props), (model, set(table) - set(props))
        for name, p in table.items():
            if p.kind != "implemented":
                assert props[name]["description"] == f"{p.kind}: {p.note}"
    doc = (ROOT / "docs" / "api.md").read_text()
    assert policy.markdown() in doc, "docs/api.md's field table is stale: run python scripts/field_table.py"
    assert script("field_table").rendered(doc) == doc  # the generator writes exactly what the policy says


@pytest.mark.parametrize("name", [n for n, p in policy.CHAT.items() if p.kind == "refused"])
def test_a_refused_field_is_an_error_naming_it(name):
    with pytest.raises(ValidationError, match=f"{name} is not supported"):
        api.ChatCompletionRequest.model_validate({"messages": USER, name: {"x": 1}})


@pytest.mark.parametrize("name", [n for n, p in policy.RESPONSES.items() if p.kind in ("refused", "default")])
def test_a_refused_responses_field_is_an_error_naming_it(name):
    from deployments.responses_api import ResponsesRequest

    with pytest.raises(ValidationError, match=f"{name}(=.*)? is not supported"):
        ResponsesRequest.model_validate({"input": "hi", name: {"x": 1}})


def test_ignored_and_default_only_fields():
    ignored = {n: "anything" for n, p in policy.CHAT.items() if p.kind == "ignored"}
    defaults = {n: p.default for n, p in policy.CHAT.items() if p.kind == "default"}
    api.ChatCompletionRequest.model_validate({"messages": USER, **ignored, **defaults})
    for name, p in policy.CHAT.items():
        if p.kind == "default":
            other = not p.default if isinstance(p.default, bool) else ["audio"] if name == "modalities" else 7
            with pytest.raises(ValidationError, match=f"{name}="):
                api.ChatCompletionRequest.model_validate({"messages": USER, name: other})
    with pytest.raises(ValidationError, match="not supported"):  # audio input
        api.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]})
    part = {"type": "image_url", "image_url": {"url": "data:,", "detail": "original"}, "uuid": "aiperf-1"}
    api.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [part]}]})
    with pytest.raises(ValidationError, match="extra"):  # a name no one defines stays an error
        api.ChatCompletionRequest.model_validate({"messages": USER, "temprature": 0.5})


def test_output_constraints():
    def spec(**body):
        return structured_output(api.ChatCompletionRequest.model_validate({"messages": USER, **body}))

    assert spec() is None and spec(response_format={"type": "text"}) is None
    assert spec(response_format={"type": "json_object"}).kind == "json_object"
    js = spec(response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                       "schema": {"type": "object"}}})
    assert js == spec(guided_json={"type": "object"}) == spec(structured_outputs={"json": '{"type": "object"}'})
    assert spec(guided_regex="[a-z]+").kind == spec(structured_outputs={"regex": "[a-z]+"}).kind == "regex"
    assert json.loads(spec(guided_choice=["a", "b"]).spec) == ["a", "b"]
    with pytest.raises(InvalidRequest, match="one output constraint"):
        spec(guided_regex="a", response_format={"type": "json_object"})
    with pytest.raises(InvalidRequest, match="invalid json schema"):
        spec(guided_json={"type": "object", "properties": {"a": {"type": "nonsense"}}})
    with pytest.raises(InvalidRequest, match="invalid regex"):
        spec(guided_regex="(")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]


def test_tools_are_written_into_the_chat_in_llama_format(tiny_pipeline):
    req = api.ChatCompletionRequest.model_validate({"tools": TOOLS, "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                     {"type": "text", "text": "weather in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]})
    messages, urls = to_hf_messages(req.messages, [t.model_dump(exclude_none=True) for t in req.tools])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "ipython"] and urls == ["data:,"]
    assert messages[1]["content"][0] == {"type": "image"}  # the image stays first
    assert messages[1]["content"][1]["text"].startswith(TOOL_PROMPT) and '"name": "get_weather"' in (
        messages[1]["content"][1]["text"])
    assert json.loads(messages[2]["content"]) == {"name": "get_weather", "parameters": {"city": "Paris"}}
    assert json.loads(messages[3]["content"]) == {"output": "sunny"}
    text = tiny_pipeline.loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|start_header_id|>ipython<|end_header_id|>" in text and text.count("<|image|>") == 1


def test_tool_calls_parse_and_the_call_schema():
    names = {"get_weather", "get_time"}
    (call,) = parse_tool_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', names)
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    two = parse_tool_calls('{"name": "get_time", "parameters": {}}; {"name": "get_weather", "arguments": {}}', names)
    assert [c.name for c in two] == ["get_time", "get_weather"]
    assert parse_tool_calls("It is sunny.", names) is None
    assert parse_tool_calls('{"name": "other", "parameters": {}}', names) is None
    assert parse_tool_calls('{"name": "get_time", "parameters": {', names) is None
    assert call_schema(TOOLS, "get_time")["properties"]["name"] == {"const": "get_time"}
    assert len(call_schema(TOOLS)["anyOf"]) == 2

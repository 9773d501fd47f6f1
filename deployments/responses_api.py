"""OpenAI's Responses API (POST /v1/responses) request, stateless like vLLM's default: its model (under the field
policy of deployments/policy.py) and its translation into the chat completions request that computes it (the one path
every request takes to the decoder); responses_renderer.py renders the answer."""

from typing import Annotated, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from pipeline.errors import InvalidRequest

from . import policy
from .api import ChatCompletionRequest, FunctionDef, JsonObjectFormat, JsonSchemaFormat, Sampling, TextFormat, _Wire

LOGPROBS = "message.output_text.logprobs"  # the one `include` this server can honour


class _Refused(BaseModel):
    """An item, part, tool or tool_choice of a type this server does not serve: a 400 that says so."""

    model_config = ConfigDict(extra="allow")
    type: str
    what: ClassVar[str] = ""
    why: ClassVar[str] = ""

    @model_validator(mode="after")
    def _refuse(self):
        raise ValueError(f"{self.what} of type {self.type!r} are not supported{self.why}")


def _kind(known: dict[str, str], default: str | None = None) -> Discriminator:
    """A discriminator by `type` (known: type -> tag) that sends an unknown type to the `refused` member: a clear
    message, not pydantic's "does not match any of the expected tags"."""
    def kind(value) -> str:
        t = value.get("type", default) if isinstance(value, dict) else getattr(value, "type", default)
        return known.get(t, "refused")
    return Discriminator(kind)


def _str_or(list_type):
    """`str | list_type`, told apart by the value's type: an error in a list names its item, without a second
    "should be a valid string" beside it."""
    return Annotated[Annotated[str, Tag("str")] | Annotated[list_type, Tag("list")],
                     Discriminator(lambda v: "str" if isinstance(v, str) else "list")]


# ---- content parts

class _InputText(_Wire):
    type: Literal["input_text", "output_text"]  # output_text: an assistant turn of an earlier response
    text: str


class _InputImage(_Wire):
    type: Literal["input_image"]
    image_url: str | None = None

    @field_validator("image_url")
    @classmethod
    def _url(cls, url):
        if not url:
            raise ValueError("an input_image needs image_url (data:, s3:// or an allowlisted https URL)")
        return url


class _Refusal(_Wire):
    type: Literal["refusal"]
    refusal: str


class _RefusedPart(_Refused):
    what = "content parts"
    why = " (the model reads text and images)"


ResponsesInputText = policy.with_policy(_InputText, policy.RESPONSES_PART, whole=False, name="ResponsesInputText")
ResponsesInputImage = policy.with_policy(_InputImage, policy.RESPONSES_PART, whole=False, name="ResponsesInputImage")
ResponsesRefusal = policy.with_policy(_Refusal, policy.RESPONSES_PART, whole=False, name="ResponsesRefusal")
Part = Annotated[Annotated[ResponsesInputText, Tag("text")] | Annotated[ResponsesInputImage, Tag("image")]
                 | Annotated[ResponsesRefusal, Tag("refusal")] | Annotated[_RefusedPart, Tag("refused")],
                 _kind({"input_text": "text", "output_text": "text", "input_image": "image", "refusal": "refusal"})]


# ---- input items

class _InputMessage(_Wire):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: _str_or(list[Part])


class _FunctionCall(_Wire):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class _FunctionCallOutput(_Wire):
    type: Literal["function_call_output"]
    call_id: str | None = None
    output: _str_or(list[ResponsesInputText])

    @field_validator("output")
    @classmethod
    def _text_only(cls, output):
        if isinstance(output, list) and any(p.type != "input_text" for p in output):
            raise ValueError("a function_call_output holds text (a string or input_text parts)")
        return output


class _RefusedItem(_Refused):
    what = "input items"
    why = " (send messages, function_call and function_call_output items; this server keeps no state to refer to)"


ResponsesInputMessage = policy.with_policy(_InputMessage, policy.RESPONSES_ITEM, whole=False, name="ResponsesInputMessage")
ResponsesFunctionCall = policy.with_policy(_FunctionCall, policy.RESPONSES_ITEM, whole=False, name="ResponsesFunctionCall")
ResponsesFunctionCallOutput = policy.with_policy(_FunctionCallOutput, policy.RESPONSES_ITEM, whole=False,
                                        name="ResponsesFunctionCallOutput")
Item = Annotated[Annotated[ResponsesInputMessage, Tag("message")] | Annotated[ResponsesFunctionCall, Tag("function_call")]
                 | Annotated[ResponsesFunctionCallOutput, Tag("function_call_output")] | Annotated[_RefusedItem, Tag("refused")],
                 _kind({t: t for t in ("message", "function_call", "function_call_output")}, default="message")]


# ---- tools, tool_choice, text

class _FunctionTool(FunctionDef):
    """The Responses API's flat function tool: chat's function definition beside its type."""

    type: Literal["function"]


class _RefusedTool(_Refused):
    what = "tools"
    why = " (built-in tools run on OpenAI's servers; send function tools)"


ResponsesFunctionTool = policy.with_policy(_FunctionTool, policy.RESPONSES_TOOL, name="ResponsesFunctionTool")
ToolParam = Annotated[Annotated[ResponsesFunctionTool, Tag("function")] | Annotated[_RefusedTool, Tag("refused")],
                      _kind({"function": "function"})]


class NamedFunction(_Wire):
    type: Literal["function"]
    name: str


class _RefusedChoice(_Refused):
    what = "tool_choice values"
    why = " (send none, auto, required or {\"type\": \"function\", \"name\": ...})"


def _choice_kind(value) -> str:
    if isinstance(value, str):
        return "mode"
    t = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "function" if t == "function" else "refused"


ToolChoice = Annotated[Annotated[Literal["none", "auto", "required"], Tag("mode")]
                       | Annotated[NamedFunction, Tag("function")] | Annotated[_RefusedChoice, Tag("refused")],
                       Discriminator(_choice_kind)]


class JsonSchemaTextFormat(JsonSchemaFormat):
    """The Responses API's json_schema format: chat's json_schema object, flat, beside its type."""

    type: Literal["json_schema"]


TextFormatParam = Annotated[TextFormat | JsonObjectFormat | JsonSchemaTextFormat, Field(discriminator="type")]


class _TextConfig(_Wire):
    format: TextFormatParam | None = None


ResponsesTextConfig = policy.with_policy(_TextConfig, policy.RESPONSES_TEXT, name="ResponsesTextConfig")


# ---- the request

# The sampling fields and vLLM extras the Responses table shares with chat: declared as chat declares them, and
# handed to chat unchanged.
SHARED = tuple(name for name, p in policy.RESPONSES.items() if p.kind == "implemented" and name in Sampling.model_fields)
_Shared = create_model("_Shared", __base__=_Wire,
                       **{name: (Sampling.model_fields[name].annotation, Sampling.model_fields[name])
                          for name in SHARED})


class _Responses(_Shared):
    input: _str_or(list[Item])
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    text: ResponsesTextConfig | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value):
        if not value:
            raise ValueError("the input is empty")
        return value

    @field_validator("include")
    @classmethod
    def _includes(cls, include):
        other = [i for i in include or [] if i != LOGPROBS]
        if other:
            raise ValueError(f"include {other} is not supported (only {LOGPROBS!r}; nothing else is kept to include)")
        return include


ResponsesRequest = policy.with_policy(_Responses, policy.RESPONSES, name="ResponsesRequest")


# ---- the translation into a chat request

def _part(p) -> dict:
    if isinstance(p, ResponsesInputImage):
        return {"type": "image_url", "image_url": {"url": p.image_url}}
    return {"type": "text", "text": p.refusal if isinstance(p, ResponsesRefusal) else p.text}


def _messages(req) -> list[dict]:
    """The chat messages of `instructions` and `input`: consecutive function_call items are one assistant turn's
    tool_calls, a function_call_output a tool turn."""
    out = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    items = [ResponsesInputMessage(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    for item in items:
        if isinstance(item, ResponsesFunctionCall):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, ResponsesFunctionCallOutput):
            content = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": content})
        else:
            content = item.content if isinstance(item.content, str) else [_part(p) for p in item.content]
            out.append({"role": item.role, "content": content})
    return out


def _tool_choice(choice):
    return {"type": "function", "function": {"name": choice.name}} if isinstance(choice, NamedFunction) else choice


def _response_format(text) -> dict | None:
    fmt = text.format if text is not None else None
    if isinstance(fmt, JsonSchemaTextFormat):
        return {"type": "json_schema", "json_schema": fmt.model_dump(by_alias=True, exclude={"type"},
                                                                     exclude_none=True)}
    return fmt.model_dump() if fmt is not None else None


def to_chat(req) -> ChatCompletionRequest:
    """The chat completions request that computes this response (n = 1); a problem only the chat request's checks
    find (a tool_choice naming no tool, a logit_bias out of range) is an InvalidRequest naming it."""
    body = req.model_dump(include=set(SHARED), exclude_none=True, by_alias=True)
    body.update(model=req.model, messages=_messages(req), max_completion_tokens=req.max_output_tokens,
                stream=req.stream, response_format=_response_format(req.text), tool_choice=_tool_choice(req.tool_choice),
                tools=[{"type": "function", "function": t.model_dump(include=set(FunctionDef.model_fields),
                                                                     exclude_none=True)} for t in req.tools or []]
                or None,
                logprobs=LOGPROBS in (req.include or []), top_logprobs=req.top_logprobs if req.include else None)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidRequest(f"invalid request: {problems}") from None

"""The OpenAI wire format: chat and text completions request models (every field of OpenAI's and vLLM's, under the
field policy of deployments/policy.py), vLLM's /tokenize and /detokenize, their mapping to SamplingParams,
StructuredOutput and TrimConfig, and the error shape."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.config import TrimConfig
from pipeline.engine.sampling import SEED_MAX, SEED_MIN, SamplingParams
from pipeline.engine.structured import StructuredOutput
from pipeline.errors import InvalidRequest

from . import policy


class _Wire(BaseModel):
    # An unknown field is refused, not silently ignored; every field OpenAI or vLLM defines is declared (the field
    # policy, deployments/policy.py, says which are implemented, ignored, or refused with a reason).
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _TextPart(_Wire):
    type: Literal["text"]
    text: str


class ImageURL(_Wire):
    url: str
    detail: Literal["auto", "low", "high", "original"] | None = None  # accepted; the processor decides the tiles


class _ImagePart(_Wire):
    type: Literal["image_url"]
    image_url: ImageURL


class _RefusedPart(BaseModel):
    """A part of a kind this model cannot read: a 400 that says so (not "unknown discriminator")."""

    model_config = ConfigDict(extra="allow")
    type: Literal["input_audio", "file"]

    @model_validator(mode="after")
    def _refuse(self):
        raise ValueError(f"content parts of type {self.type!r} are not supported (the model reads text and images)")


TextPart = policy.with_policy(_TextPart, policy.PART, whole=False, name="TextPart")
ImagePart = policy.with_policy(_ImagePart, policy.PART, whole=False, name="ImagePart")
Part = Annotated[TextPart | ImagePart | _RefusedPart, Field(discriminator="type")]


class FunctionCall(_Wire):
    name: str
    arguments: str  # a JSON object


class ToolCallIn(_Wire):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class _Message(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    tool_calls: list[ToolCallIn] | None = None

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


Message = policy.with_policy(_Message, policy.MESSAGE, name="Message")


class StreamOptions(_Wire):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk (guidellm sends it)
    include_obfuscation: bool | None = None  # OpenAI's padding of chunks against side channels; nothing to hide here


class TrimOverride(_Wire):
    """The request's `trim` extension as an object: {"k_ratio": R}, {"enabled": false}, or TrimConfig fields."""

    enabled: bool | None = None
    policy: Literal["topk_union", "target", "budget", "mass", "none", "elastic"] | None = None
    k_ratio: float | None = None
    target_fraction: float | None = None
    budget_tokens: int | None = None
    mass: float | None = None
    # elastic (docs/elastic.md): the kept fraction follows the decoder pool's KV pressure between these; `elastic:
    # false` opts out (the ceiling, never shed)
    floor_fraction: float | None = None
    ceiling_fraction: float | None = None
    elastic: bool | None = None


class FunctionDef(_Wire):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # calls forced by tool_choice always follow the schema


class Tool(_Wire):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Wire):
    name: str


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Wire):
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None  # always enforced


class TextFormat(_Wire):
    type: Literal["text"]


class JsonObjectFormat(_Wire):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_Wire):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]


class StructuredOutputs(_Wire):
    """vLLM's structured_outputs: exactly one constraint."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None  # JSON always has fixed separators here
    disable_fallback: bool | None = None  # there is one backend, xgrammar
    disable_additional_properties: bool | None = None  # a strict schema sets additionalProperties itself


class Sampling(_Wire):
    """The fields both completion endpoints implement."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0: the prompt scored only (echo or prompt_logprobs)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)  # completions sharing the prompt's and the image's KV pages
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None  # JSON keys are token ids as strings
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False  # as vLLM: keep going to max_tokens (benchmarks)
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    trim: TrimOverride | Literal["topk_union", "budget", "mass", "none", "elastic"] | None = None
    return_token_ids: bool = False
    cache_salt: str | None = Field(None, min_length=1)  # vLLM's: only requests with the same salt share cached pages
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM: each prompt token's logprob, rank, top k

    @model_validator(mode="after")
    def _scoring(self):
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not available with stream: true (as vLLM)")
        if self.max_tokens == 0 and not (getattr(self, "echo", False) or self.prompt_logprobs is not None):
            raise ValueError("max_tokens: 0 generates nothing; it needs echo or prompt_logprobs (the prompt scored)")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias):
        for token, value in (bias or {}).items():
            if token < 0 or not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias: token {token} -> {value}; token ids are >= 0, biases in [-100, 100]")
        return bias


class Chat(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self):
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        return self


MAX_PROMPTS = 256  # prompts in one text-completions request (evaluation harnesses batch them)


class Text(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False  # the prompt's text (and with logprobs its tokens' log-probabilities) before the completion

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt):
        many = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
        if many and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"{len(prompt)} prompts in one request; at most {MAX_PROMPTS}")
        if not prompt or (many and not all(prompt)):
            raise ValueError("the prompt is empty")
        return prompt

    @property
    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: choice i * n + j is prompt i's completion j (as OpenAI's)."""
        many = isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list))
        return list(self.prompt) if many else [self.prompt]


ChatCompletionRequest = policy.with_policy(Chat, policy.CHAT, name="ChatCompletionRequest")
CompletionRequest = policy.with_policy(Text, policy.COMPLETIONS, name="CompletionRequest")


class TokenizeRequest(_Wire):
    """vLLM's /tokenize: a text prompt, or chat messages rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)  # an empty chat has nothing for the template
    add_special_tokens: bool = True  # a text prompt: with <|begin_of_text|>
    add_generation_prompt: bool = True  # messages: the assistant header appended
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt or messages")
        return self


class DetokenizeRequest(_Wire):
    model: str | None = None
    tokens: list[int] = Field(min_length=1)


# Request fields that map one-to-one onto SamplingParams fields of the same name; a field left out (None) takes
# SamplingParams' default.
SAMPLING_FIELDS = ("temperature", "top_p", "seed", "ignore_eos", "n", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "min_p", "min_tokens", "logit_bias", "stop_token_ids", "cache_salt")


def sampling_fields(req: Sampling, default_max_tokens: int) -> dict:
    """The SamplingParams fields a request sets (None: not set)."""
    fields = {name: getattr(req, name) for name in SAMPLING_FIELDS}
    fields["top_k"] = 0 if req.top_k == -1 else req.top_k  # vLLM's "off" is -1, the sampler's 0
    asked = (getattr(req, "max_completion_tokens", None), req.max_tokens)
    fields["max_tokens"] = next((m for m in asked if m is not None), default_max_tokens)
    fields["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if isinstance(req, Chat):
        fields["logprobs"], fields["top_logprobs"] = req.logprobs, req.top_logprobs
    elif req.logprobs is not None:
        fields["logprobs"], fields["top_logprobs"] = True, req.logprobs
    fields["prompt_logprobs"] = req.prompt_logprobs
    if getattr(req, "echo", False) and req.prompt_logprobs is None and req.logprobs is not None:
        fields["prompt_logprobs"] = req.logprobs  # echo's logprobs cover the prompt too (vLLM's rule)
    return fields


def to_sampling_params(req: Sampling, default_max_tokens: int,
                       structured: StructuredOutput | None = None) -> SamplingParams:
    """The request's SamplingParams (what crosses to the decoder); a value the sampler refuses is a 400."""
    if isinstance(req, Chat) and req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs: true")
    fields = {k: v for k, v in sampling_fields(req, default_max_tokens).items() if v is not None}
    try:
        return SamplingParams(**fields, structured=structured)
    except ValueError as exc:
        loc = exc.errors()[0]["loc"] if isinstance(exc, ValidationError) else ()
        raise InvalidRequest(f"bad sampling parameters: {exc}", param=str(loc[0]) if loc else None) from exc


def fit_max_tokens(req: Sampling, params: SamplingParams, prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """A request that names no max_tokens gets the deployment's default cut to the room its prompt leaves: the
    default never makes a request fail."""
    room = max_model_len - prompt_tokens
    asked = req.max_tokens or getattr(req, "max_completion_tokens", None)
    if asked is None and 0 < room < params.max_tokens:
        return params.model_copy(update={"max_tokens": room})
    return params


def validation_message(errors: list[dict]) -> str:
    """A schema violation as the 400's message, naming the fields (pydantic's errors, FastAPI's `body.` locations)."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
    return f"invalid request: {problems}"


def schema_error_body(errors: list[dict]) -> dict:
    """A schema violation's 400 body (pydantic's errors at FastAPI's `body.` locations): the message names the
    fields, `param` the first one, as OpenAI's does."""
    loc = [p for p in errors[0]["loc"] if p != "body"] if errors else []
    return error_body(400, validation_message(errors), field_path(loc) or None)


def to_trim_config(override: TrimOverride | str | None, default: TrimConfig) -> TrimConfig:
    """Merge the request's `trim` over the deployment's default."""
    if override is None:
        return default
    if isinstance(override, str):
        fields = {"policy": override}
    else:
        fields = override.model_dump(exclude_none=True, exclude={"enabled"})
        if override.enabled is False:
            fields = {"policy": "none"}
        elif "k_ratio" in fields and "policy" not in fields:
            fields["policy"] = "topk_union"  # {"k_ratio": R} means Trimmed-Llama's top-k at that ratio
    try:
        return TrimConfig(**{**default.model_dump(), **fields})
    except ValueError as exc:
        raise InvalidRequest(f"bad trim settings: {exc}") from exc


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "overloaded_error"}


def field_path(parts) -> str:
    """("messages", 0, "content") -> "messages[0].content"."""
    path = ""
    for p in parts:
        path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
    return path


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error object; `param` names the request field at fault (a 400's), as OpenAI's does."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every non-2xx answer of this server."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict:
    """FastAPI `responses=` documenting each status with the error shape (the OpenAPI document lists them)."""
    return {s: {"model": ErrorResponse, "description": ERROR_TYPES.get(s, "server_error")} for s in statuses}

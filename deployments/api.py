"""The OpenAI wire format: chat-completions request models (plus the `trim` extension), their mapping to
SamplingParams and TrimConfig, and the error shape."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import TrimConfig
from pipeline.engine.sampling import SEED_MAX, SEED_MIN, SamplingParams
from pipeline.errors import InvalidRequest


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unsupported OpenAI field is refused, not silently ignored


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ImageURL(_Wire):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted for compatibility; the processor decides


class ImagePart(_Wire):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Wire):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Wire):
    include_usage: bool = False


class TrimOverride(_Wire):
    """The request's `trim` extension as an object: {"k_ratio": R}, {"enabled": false}, or TrimConfig fields."""

    enabled: bool | None = None
    policy: Literal["topk_union", "target", "budget", "mass", "none"] | None = None
    k_ratio: float | None = None
    target_fraction: float | None = None
    budget_tokens: int | None = None
    mass: float | None = None


class ChatCompletionRequest(_Wire):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)  # completions sharing the prompt's and the image's KV pages
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions.
    top_k: int | None = Field(None, ge=0)
    ignore_eos: bool = False  # as vLLM: keep going to max_tokens (benchmarks)
    trim: TrimOverride | Literal["topk_union", "budget", "mass", "none"] | None = None
    return_token_ids: bool = False


# Request fields that map one-to-one onto SamplingParams fields of the same name; a field left out (None) takes
# SamplingParams' default. A new OpenAI field the sampler understands is one more name here (or, when it needs
# translating, one more entry in `sampling_fields`).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "ignore_eos", "n", "logprobs", "top_logprobs")


def sampling_fields(req: ChatCompletionRequest, default_max_tokens: int) -> dict:
    """The SamplingParams fields a request sets (None: not set)."""
    fields = {name: getattr(req, name) for name in SAMPLING_FIELDS}
    fields["max_tokens"] = req.max_completion_tokens or req.max_tokens or default_max_tokens
    fields["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return fields


def to_sampling_params(req: ChatCompletionRequest, default_max_tokens: int) -> SamplingParams:
    """The request's SamplingParams (what crosses to the decoder); a value the sampler refuses is a 400."""
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs: true")
    fields = sampling_fields(req, default_max_tokens)
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as exc:
        raise InvalidRequest(f"bad sampling parameters: {exc}") from exc


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


def error_body(status: int, message: str) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


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

"""The OpenAI chat-completions wire format (plus the `trim` extension) and its mapping to pipeline types."""

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import TrimConfig
from pipeline.engine.sampling import SamplingParams
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
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions.
    top_k: int | None = Field(None, ge=0)
    ignore_eos: bool = False  # as vLLM: keep going to max_tokens (benchmarks)
    trim: TrimOverride | Literal["topk_union", "budget", "mass", "none"] | None = None
    return_token_ids: bool = False


def to_hf_messages(messages: list[Message]) -> tuple[list[dict], list[str]]:
    """HF chat-template messages (an {"type": "image"} slot per image part) and the image URLs in order."""
    out, urls = [], []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        content = []
        for part in m.content:
            if isinstance(part, ImagePart):
                content.append({"type": "image"})
                urls.append(part.image_url.url)
            else:
                content.append({"type": "text", "text": part.text})
        out.append({"role": m.role, "content": content})
    return out, urls


def prompt_chars(messages: list[Message]) -> int:
    return sum(len(m.content) if isinstance(m.content, str) else
               sum(len(p.text) for p in m.content if isinstance(p, TextPart)) for m in messages)


def to_sampling_params(req: ChatCompletionRequest, default_max_tokens: int) -> SamplingParams:
    if req.n != 1:
        raise InvalidRequest(f"n={req.n}: only n=1 is supported")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    fields = dict(
        max_tokens=req.max_completion_tokens or req.max_tokens or default_max_tokens,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=stop,
        ignore_eos=req.ignore_eos,
    )
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


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
               extra: dict) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
        **extra,
    }


def chunk(rid: str, model: str, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **extra}


def usage_chunk(rid: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def error_body(status: int, message: str) -> dict:
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "overloaded_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}

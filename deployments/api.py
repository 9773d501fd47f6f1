"""The OpenAI chat-completions wire format (plus the `trim` extension) and its mapping to pipeline types."""

import time
import uuid
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


TEMPLATE_TOKENS_PER_MESSAGE = 4  # Llama 3's chat template wraps each message in at least 4 special tokens


def check_shape(messages: list[Message], max_messages: int, max_prompt_tokens: int) -> None:
    """Refuse before templating and tokenising: too many messages, the template alone past the token limit, text
    that is not Unicode (lone surrogates a JSON escape can carry)."""
    if len(messages) > max_messages:
        raise InvalidRequest(f"{len(messages)} messages; this deployment accepts at most {max_messages}")
    if len(messages) * TEMPLATE_TOKENS_PER_MESSAGE > max_prompt_tokens:
        raise InvalidRequest(f"{len(messages)} messages exceed the prompt limit of {max_prompt_tokens} tokens")
    for m in messages:
        texts = [m.content] if isinstance(m.content, str) else [p.text for p in m.content if isinstance(p, TextPart)]
        for text in texts + ([m.name] if m.name else []):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest("a message's text is not valid Unicode (a lone surrogate)") from None


def to_sampling_params(req: ChatCompletionRequest, default_max_tokens: int) -> SamplingParams:
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs: true")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    fields = dict(
        max_tokens=req.max_completion_tokens or req.max_tokens or default_max_tokens,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=stop,
        ignore_eos=req.ignore_eos, n=req.n, logprobs=req.logprobs, top_logprobs=req.top_logprobs,
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


def choice(index: int, text: str, finish_reason: str, logprobs: list[dict] | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": None if logprobs is None else {"content": logprobs}, "finish_reason": finish_reason}


def completion(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int,
               extra: dict) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": choices, "usage": usage(prompt_tokens, completion_tokens), **extra,
    }


class TokenBytes:
    """A token id's text and exact bytes for OpenAI's logprobs entries (byte-level BPE: a token may be part of
    a UTF-8 character, so its bytes come from the vocabulary, not from decoding it alone)."""

    def __init__(self, tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer, self.byte_of = tokenizer, {c: b for b, c in bytes_to_unicode().items()}

    def __call__(self, token_id: int) -> dict:
        piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
        raw = (bytes(self.byte_of[c] for c in piece) if all(c in self.byte_of for c in piece)
               else piece.encode())
        return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}

    def entries(self, item: dict) -> list[dict]:
        """One OpenAI logprobs `content` entry per new token of a decoder item."""
        tops = item.get("top_logprobs") or [[] for _ in item["logprobs"]]
        return [{**self(t), "logprob": lp, "top_logprobs": [{**self(i), "logprob": v} for i, v in top]}
                for t, lp, top in zip(item["new_token_ids"], item["logprobs"], tops)]


def chunk(rid: str, model: str, delta: dict, finish_reason: str | None = None, index: int = 0,
          logprobs: list[dict] | None = None, **extra) -> dict:
    choices = [{"index": index, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": finish_reason}]
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **extra}


def usage_chunk(rid: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


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

"""One request's n completions accumulated from the decoder's stream (per-index text, tokens, logprobs, finish
reasons, usage), and the two ways out of it: one JSON body, or SSE events as the tokens come."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from pipeline.types import RequestOutput

from .api import error_body
from .faults import classify
from .http_app import ApiError
from .stream import StageError, TrimSummary


class TokenLogprob(NamedTuple):
    """One generated token's log-probability and the most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), empty unless top_logprobs was asked for


def token_logprobs(out: RequestOutput) -> list[TokenLogprob]:
    tops = out.top_logprobs or [[] for _ in out.logprobs]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(out.new_token_ids, out.logprobs, tops)]


@dataclass
class Completion:
    """Completion `index` of a request so far."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    completion_tokens: int = 0
    kept_tokens_end: int | None = None  # elastic: kept visual tokens when it finished
    shed_at: int | None = None  # elastic: the output token from which it attended to fewer

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class Accumulator:
    """Every RequestOutput of a request's n completions, by index: what both the JSON body and the SSE stream read."""

    def __init__(self, n: int):
        self.completions = [Completion(i) for i in range(n)]
        self.prompt_tokens = 0

    def add(self, out: RequestOutput) -> Completion:
        c = self.completions[out.index]
        c.text_parts.append(out.new_text)
        c.token_ids += out.new_token_ids
        c.logprobs += token_logprobs(out)
        c.finished, c.finish_reason, c.completion_tokens = out.finished, out.finish_reason, out.completion_tokens
        if out.kept_tokens_end is not None:
            c.kept_tokens_end, c.shed_at = out.kept_tokens_end, out.shed_at
        self.prompt_tokens = out.prompt_tokens
        return c

    @property
    def done(self) -> bool:
        return all(c.finished for c in self.completions)

    @property
    def unfinished(self) -> list[Completion]:
        return [c for c in self.completions if not c.finished]

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.completions)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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

    def entries(self, rows: list[TokenLogprob]) -> list[dict]:
        """One OpenAI logprobs `content` entry per token."""
        return [{**self(r.token_id), "logprob": r.logprob,
                 "top_logprobs": [{**self(i), "logprob": v} for i, v in r.top]} for r in rows]


class DecoderStream:
    """The decoder's stream from its first RequestOutput on (the TrimSummary, if any, already read); a failure
    mid-stream (a replica lost) becomes a StageError, the last item."""

    def __init__(self, items, first: RequestOutput, trim: TrimSummary | None):
        self.items, self.first, self.trim = items, first, trim

    async def __aiter__(self) -> AsyncIterator[RequestOutput | StageError]:
        yield self.first
        while True:
            try:
                item = await self.items.__anext__()
            except asyncio.CancelledError:
                raise
            except StopAsyncIteration:  # the decoder ends its stream after the last completion finished, or an error
                yield classify(RuntimeError("the decoder's stream ended before every completion finished"))
                return
            except Exception as exc:  # noqa: BLE001 - classify logs it; the client sees no internals
                yield classify(exc)
                return
            yield item

    def close(self) -> None:
        """A no-op when finished; frees the KV when the client went away mid-request."""
        self.items.cancel()


class Renderer(Protocol):
    """One response format (chat completions; text completions would be another) over an Accumulator."""

    include_usage: bool

    def body(self, acc: Accumulator) -> dict: ...
    def opening(self) -> list[dict]: ...
    def chunk(self, c: Completion, out: RequestOutput) -> dict | None: ...
    def closing(self, c: Completion) -> dict: ...
    def usage_chunk(self, acc: Accumulator) -> dict: ...


async def collect(stream: DecoderStream, acc: Accumulator, render: Renderer, retry_after_s: int) -> dict:
    """The whole response as one JSON body; a StageError before the end is the request's HTTP error."""
    try:
        async for item in stream:
            if isinstance(item, StageError):
                raise ApiError.of(item, retry_after_s)
            acc.add(item)
            if acc.done:
                break
    finally:
        stream.close()
    return render.body(acc)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def events(stream: DecoderStream, acc: Accumulator, render: Renderer,
                 gap: Callable[[float], None] = lambda s: None) -> AsyncIterator[str]:
    """The response as SSE events; `gap` sees the time between decoder items. After the 200 header an error
    travels in the stream, and every completion still open ends with finish_reason "error"."""
    try:
        for chunk in render.opening():
            yield sse(chunk)
        prev = None
        async for item in stream:
            now = time.perf_counter()
            if prev is not None:
                gap(now - prev)
            prev = now
            if isinstance(item, StageError):
                yield sse(error_body(item.status, item.message))
                for c in acc.unfinished:
                    yield sse(render.closing(c))
                break
            c = acc.add(item)
            chunk = render.chunk(c, item)
            if chunk is not None:
                yield sse(chunk)
            if acc.done:
                break
        if render.include_usage:
            yield sse(render.usage_chunk(acc))
        yield "data: [DONE]\n\n"
    finally:
        stream.close()  # the client disconnected (or we are done): stop the decoder's generator

"""One request's n completions accumulated from the decoder's stream (per-index text, tokens, logprobs, finish
reasons, usage), and the two ways out of it: one JSON body, or SSE events as the tokens come (a Renderer says
how: chat.py, completions.py, responses_renderer.py)."""

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from pipeline.types import PromptLogprob, RequestOutput

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


def stop_logprob(out: RequestOutput) -> TokenLogprob | None:
    """The stop token that ended a completion, with its logprob (when asked): the legacy completions shape lists it,
    as vLLM's does (lm-evaluation-harness drops the last entry of an echoed max_tokens 1 completion)."""
    if out.stop_token_id is None or not out.logprobs:
        return None
    return TokenLogprob(out.stop_token_id, out.logprobs[0], out.top_logprobs[0] if out.top_logprobs else [])


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
    stop: TokenLogprob | None = None  # the stop token that ended it, with logprobs asked (not in the text)
    kept_tokens_end: int | None = None  # elastic: kept visual tokens when it finished
    shed_at: int | None = None  # elastic: the output token from which it attended to fewer

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class Accumulator:
    """Every RequestOutput of a request's n completions, by index: what both the JSON body and the SSE stream read."""

    def __init__(self, n: int):
        self.completions = [Completion(i) for i in range(n)]
        self.prompt_tokens = self.cached_tokens = 0
        self.prompt_logprobs: list[PromptLogprob | None] | None = None  # with prompt_logprobs: from completion 0

    def add(self, out: RequestOutput) -> Completion:
        c = self.completions[out.index]
        c.text_parts.append(out.new_text)
        c.token_ids += out.new_token_ids
        c.logprobs += token_logprobs(out)
        c.stop = stop_logprob(out) or c.stop
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        c.finished, c.finish_reason, c.completion_tokens = out.finished, out.finish_reason, out.completion_tokens
        if out.kept_tokens_end is not None:
            c.kept_tokens_end, c.shed_at = out.kept_tokens_end, out.shed_at
        self.prompt_tokens, self.cached_tokens = out.prompt_tokens, out.cached_tokens
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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens the prefix cache gave (not computed again)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


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

    def prompt_logprobs(self, rows: list[PromptLogprob | None]) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt position (the first: null) {token id: {logprob, rank, decoded_token}}
        for the prompt's token and the top k (ranks 1..k)."""
        def entry(r: PromptLogprob) -> dict:
            top = {i: {"logprob": v, "rank": rank, "decoded_token": self(i)["token"]}
                   for rank, (i, v) in enumerate(r.top, 1)}
            own = {"logprob": r.logprob, "rank": r.rank, "decoded_token": self(r.token_id)["token"]}
            return {r.token_id: own, **top}

        return [None] + [entry(r) if r is not None else None for r in rows]


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
    """One response format (chat completions, text completions, Responses) over an Accumulator: `body` for JSON,
    the rest for SSE. `chunk` gives none, one or several events; `frame` writes one as SSE."""

    def body(self, acc: Accumulator) -> dict: ...
    def opening(self) -> list[dict]: ...
    def chunk(self, c: Completion, out: RequestOutput) -> dict | list[dict] | None: ...
    def failure(self, error: StageError, acc: Accumulator) -> list[dict]: ...
    def ending(self, acc: Accumulator) -> list[str]: ...
    def frame(self, event: dict) -> str: ...


class ChunkStream:
    """The SSE of chat and text completions: `data:` chunks; a failure as OpenAI's error body, then every open
    completion's closing chunk; the usage chunk when asked for; `data: [DONE]` last. The class it is mixed into gives
`closing(c)`, `usage_chunk(acc)` and `include_usage`."""

    def frame(self, event: dict) -> str:
        return sse(event)

    def failure(self, error: StageError, acc: Accumulator) -> list[dict]:
        return [error_body(error.status, error.message), *(self.closing(c) for c in acc.unfinished)]

    def ending(self, acc: Accumulator) -> list[str]:
        return ([sse(self.usage_chunk(acc))] if self.include_usage else []) + ["data: [DONE]\n\n"]


async def drain(stream: DecoderStream, acc: Accumulator, retry_after_s: int) -> Accumulator:
    """Every output of the stream into `acc`; a StageError before the end is the request's HTTP error."""
    try:
        async for item in stream:
            if isinstance(item, StageError):
                raise ApiError.of(item, retry_after_s)
            acc.add(item)
            if acc.done:
                break
    finally:
        stream.close()
    return acc


async def collect(stream: DecoderStream, acc: Accumulator, render: Renderer, retry_after_s: int) -> dict:
    """The whole response as one JSON body."""
    return render.body(await drain(stream, acc, retry_after_s))


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def chunks(stream: DecoderStream, acc: Accumulator, render: Renderer,
                 gap: Callable[[float], None] = lambda s: None) -> AsyncIterator[dict]:
    """The response's event objects as the outputs come, without its ending; `gap` sees the time between decoder
    items. After the 200 header an error travels in the stream (render.failure says how: chat and completions end
    every completion still open with finish_reason "error")."""
    try:
        for event in render.opening():
            yield event
        prev = None
        async for item in stream:
            now = time.perf_counter()
            if prev is not None:
                gap(now - prev)
            prev = now
            if isinstance(item, StageError):
                for event in render.failure(item, acc):
                    yield event
                break
            c = acc.add(item)
            chunk = render.chunk(c, item)
            for event in [chunk] if isinstance(chunk, dict) else chunk or []:
                yield event
            if acc.done:
                break
    finally:
        stream.close()  # the client disconnected (or we are done): stop the decoder's generator


async def merged(sources: list[AsyncIterator[dict]]) -> AsyncIterator[dict]:
    """The items of several async iterators as they come, each one's in its order; closing this closes them all."""
    queue, end = asyncio.Queue(), object()

    async def pump(source):
        try:
            async with contextlib.aclosing(source):
                async for item in source:
                    await queue.put(item)
            await queue.put(end)
        except Exception as exc:  # noqa: BLE001 - raised to the consumer below
            await queue.put(exc)

    tasks = [asyncio.ensure_future(pump(s)) for s in sources]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is end:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def events(stream: DecoderStream, acc: Accumulator, render: Renderer,
           gap: Callable[[float], None] = lambda s: None) -> AsyncIterator[str]:
    """One stream's response as SSE events: `chunks` framed by the renderer, then its ending (chat and completions:
    the usage chunk when asked, [DONE]; Responses: none)."""
    return sse_events(chunks(stream, acc, render, gap), render.frame, lambda: render.ending(acc))


async def sse_events(items: AsyncIterator[dict], frame: Callable[[dict], str],
                     ending: Callable[[], list[str]]) -> AsyncIterator[str]:
    """Event objects framed as SSE, then the lines of `ending()` (computed once every item is out); closing this
    closes `items`."""
    async with contextlib.aclosing(items):
        async for event in items:
            yield frame(event)
    for line in ending():
        yield line

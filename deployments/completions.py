"""OpenAI text-completion bodies and SSE chunks (`text_completion`) rendered from Accumulators: the legacy
/v1/completions, with its logprobs shape (tokens, token_logprobs, top_logprobs, text_offset), several prompts a
request (choice i * n + j is prompt i's completion j, as OpenAI's), `echo` (the prompt's text, and with logprobs
its tokens' log-probabilities, the first one null) and vLLM's per-choice `prompt_logprobs`."""

import time
import uuid
from dataclasses import dataclass

from pipeline.types import PromptLogprob, RequestOutput

from .api import CompletionRequest
from .responses import (
    Accumulator,
    ChunkStream,
    Completion,
    TokenBytes,
    TokenLogprob,
    sse,
    stop_logprob,
    token_logprobs,
    usage,
)


def text_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


@dataclass
class TextPrompt:
    """One prompt of a request, as `echo` repeats it: the text sent (token ids: their decoded text) and its ids."""

    text: str
    token_ids: list[int]


def prompt_rows(prompt: TextPrompt, scores: list[PromptLogprob | None] | None) -> list[TokenLogprob]:
    """The prompt's tokens as logprobs rows: the first (and any the model cannot produce) with logprob None; each
    row's alternatives are the token itself and the top k (vLLM's prompt_logprobs dict)."""
    rows = [TokenLogprob(prompt.token_ids[0], None, None)]
    for token, r in zip(prompt.token_ids[1:], scores or []):
        rows.append(TokenLogprob(token, None, None) if r is None
                    else TokenLogprob(token, r.logprob, [(token, r.logprob), *r.top]))
    return rows


class TextRenderer(ChunkStream):
    """One prompt's completions in a text-completion response (the Renderer of responses.collect and
    responses.events); `offset`: the choice index of its first completion (prompt i: i * n)."""

    def __init__(self, req: CompletionRequest, rid: str, model: str, token_bytes: TokenBytes,
                 prompt: TextPrompt | None = None, offset: int = 0):
        self.req, self.rid, self.model, self.token_bytes = req, rid, model, token_bytes
        self.echo = prompt if req.echo else None
        self.offset = offset
        options = req.stream_options
        self.include_usage = bool(options and options.include_usage)
        self.continuous_usage = bool(options and options.continuous_usage_stats)
        self.offsets = [0] * req.n  # characters already sent per completion: text_offset of the next token
        self.scores: list[PromptLogprob | None] | None = None  # the prompt's, once completion 0 brought them
        self.started: set[int] = set()  # completions whose first chunk was sent

    def _logprobs(self, rows: list[TokenLogprob], start: int) -> dict | None:
        if self.req.logprobs is None:
            return None
        tokens = [self.token_bytes(r.token_id)["token"] for r in rows]
        offsets, at = [], start
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [r.logprob for r in rows],
                "top_logprobs": [None if r.top is None else {self.token_bytes(i)["token"]: v for i, v in r.top}
                                 for r in rows],
                "text_offset": offsets}

    def _response(self, choices: list[dict], **extra) -> dict:
        return {"id": self.rid, "object": "text_completion", "created": int(time.time()), "model": self.model,
                "choices": choices, **extra}

    def choices(self, acc: Accumulator) -> list[dict]:
        head, rows = ("", []) if self.echo is None else (self.echo.text, prompt_rows(self.echo, acc.prompt_logprobs))
        out = []
        for c in acc.completions:
            choice = {"index": self.offset + c.index, "text": head + c.text,
                      "logprobs": self._logprobs(rows + c.logprobs + ([c.stop] if c.stop else []), 0),
                      "finish_reason": c.finish_reason}
            if self.req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self.token_bytes.prompt_logprobs(acc.prompt_logprobs or [])
            out.append(choice)
        return out

    def body(self, acc: Accumulator) -> dict:
        return text_body([self], [acc])

    def opening(self) -> list[dict]:
        return []

    def chunk(self, c: Completion, out: RequestOutput) -> dict | None:
        if out.prompt_logprobs is not None:  # completion 0's first output: before its siblings' (one engine step)
            self.scores = out.prompt_logprobs
        echoed = self.echo is not None and c.index not in self.started  # the echo goes with the first chunk
        head, rows = ("", []) if not echoed else (self.echo.text, prompt_rows(self.echo, self.scores))
        if not (head or out.new_text or out.new_token_ids or out.finished):
            return None
        self.started.add(c.index)
        stop = stop_logprob(out)
        rows = rows + token_logprobs(out) + ([stop] if stop else [])
        logprobs = self._logprobs(rows, self.offsets[c.index]) if rows else None
        self.offsets[c.index] += len(head) + len(out.new_text)
        extra = ({"usage": usage(out.prompt_tokens, c.completion_tokens, out.cached_tokens)}
                 if self.continuous_usage else {})
        choice = {"index": self.offset + c.index, "text": head + out.new_text, "logprobs": logprobs,
                  "finish_reason": out.finish_reason if out.finished else None}
        return self._response([choice], **extra)

    def closing(self, c: Completion) -> dict:
        return self._response([{"index": self.offset + c.index, "text": "", "logprobs": None,
                                "finish_reason": "error"}])

    def usage_chunk(self, acc: Accumulator) -> dict:
        return usage_chunk([self], [acc])


def _usage(accs: list[Accumulator]) -> dict:
    return usage(sum(a.prompt_tokens for a in accs), sum(a.completion_tokens for a in accs),
                 sum(a.cached_tokens for a in accs))


def text_body(renders: list[TextRenderer], accs: list[Accumulator]) -> dict:
    """The JSON body of a request's prompts (renders[i] and accs[i]: prompt i), choices in index order."""
    choices = [ch for r, a in zip(renders, accs) for ch in r.choices(a)]
    first = renders[0]
    extra = {"token_ids": [c.token_ids for a in accs for c in a.completions]} if first.req.return_token_ids else {}
    return first._response(choices, usage=_usage(accs), **extra)


def usage_chunk(renders: list[TextRenderer], accs: list[Accumulator]) -> dict:
    """The stream's closing usage chunk, over every prompt."""
    return renders[0]._response([], usage=_usage(accs))


def text_ending(renders: list[TextRenderer], accs: list[Accumulator]) -> list[str]:
    """The SSE lines after every prompt's chunks: the usage chunk over every prompt when asked, then [DONE]."""
    return ([sse(usage_chunk(renders, accs))] if renders[0].include_usage else []) + ["data: [DONE]\n\n"]

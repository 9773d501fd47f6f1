"""OpenAI text-completion bodies and SSE chunks (`text_completion`) rendered from an Accumulator: the legacy
/v1/completions, with its logprobs shape (tokens, token_logprobs, top_logprobs, text_offset)."""

import time
import uuid

from pipeline.types import RequestOutput

from .api import CompletionRequest
from .responses import Accumulator, Completion, TokenBytes, TokenLogprob, token_logprobs, usage


def text_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class TextRenderer:
    """One text-completion request's response (the Renderer of responses.collect and responses.events)."""

    def __init__(self, req: CompletionRequest, rid: str, model: str, token_bytes: TokenBytes):
        self.req, self.rid, self.model, self.token_bytes = req, rid, model, token_bytes
        options = req.stream_options
        self.include_usage = bool(options and options.include_usage)
        self.continuous_usage = bool(options and options.continuous_usage_stats)
        self.offsets = [0] * req.n  # characters already sent per completion: text_offset of the next token

    def _logprobs(self, rows: list[TokenLogprob], start: int) -> dict | None:
        if self.req.logprobs is None:
            return None
        tokens = [self.token_bytes(r.token_id)["token"] for r in rows]
        offsets, at = [], start
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [r.logprob for r in rows],
                "top_logprobs": [{self.token_bytes(i)["token"]: v for i, v in r.top} for r in rows],
                "text_offset": offsets}

    def _response(self, choices: list[dict], **extra) -> dict:
        return {"id": self.rid, "object": "text_completion", "created": int(time.time()), "model": self.model,
                "choices": choices, **extra}

    def body(self, acc: Accumulator) -> dict:
        choices = [{"index": c.index, "text": c.text, "logprobs": self._logprobs(c.logprobs, 0),
                    "finish_reason": c.finish_reason} for c in acc.completions]
        extra = {"token_ids": [c.token_ids for c in acc.completions]} if self.req.return_token_ids else {}
        return self._response(choices, usage=usage(acc.prompt_tokens, acc.completion_tokens, acc.cached_tokens), **extra)

    def opening(self) -> list[dict]:
        return []

    def chunk(self, c: Completion, out: RequestOutput) -> dict | None:
        if not (out.new_text or out.new_token_ids or out.finished):
            return None
        logprobs = self._logprobs(token_logprobs(out), self.offsets[c.index]) if out.new_token_ids else None
        self.offsets[c.index] += len(out.new_text)
        extra = {"usage": usage(out.prompt_tokens, c.completion_tokens, out.cached_tokens)} if self.continuous_usage else {}
        choice = {"index": c.index, "text": out.new_text, "logprobs": logprobs,
                  "finish_reason": out.finish_reason if out.finished else None}
        return self._response([choice], **extra)

    def closing(self, c: Completion) -> dict:
        return self._response([{"index": c.index, "text": "", "logprobs": None, "finish_reason": "error"}])

    def usage_chunk(self, acc: Accumulator) -> dict:
        return self._response([], usage=usage(acc.prompt_tokens, acc.completion_tokens, acc.cached_tokens))

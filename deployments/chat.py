"""OpenAI chat-completion bodies and SSE chunks (`chat.completion`, `chat.completion.chunk`) rendered from an
Accumulator, with the `trim` and `token_ids` extensions."""

import time
import uuid

from pipeline.types import RequestOutput

from .api import ChatCompletionRequest
from .responses import Accumulator, Completion, TokenBytes, token_logprobs, usage
from .stream import TrimSummary


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatRenderer:
    """One chat request's response: `body` for JSON, the rest for SSE (see responses.collect and responses.events)."""

    def __init__(self, req: ChatCompletionRequest, rid: str, model: str, trim: TrimSummary | None,
                 token_bytes: TokenBytes):
        self.req, self.rid, self.model, self.token_bytes = req, rid, model, token_bytes
        self.trim = trim.as_dict() if trim else None
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def extra(self, token_ids) -> dict:
        extra = {"trim": self.trim}
        if self.req.return_token_ids:
            extra["token_ids"] = token_ids
        return extra

    def _logprobs(self, rows) -> dict | None:
        return {"content": self.token_bytes.entries(rows)} if rows is not None else None

    def body(self, acc: Accumulator) -> dict:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._logprobs(c.logprobs if self.req.logprobs else None),
                    "finish_reason": c.finish_reason} for c in acc.completions]
        token_ids = [c.token_ids for c in acc.completions]
        return {
            "id": self.rid, "object": "chat.completion", "created": int(time.time()), "model": self.model,
            "choices": choices, "usage": usage(acc.prompt_tokens, acc.completion_tokens),
            **self.extra(token_ids[0] if len(token_ids) == 1 else token_ids),
        }

    def _chunk(self, index: int, delta: dict, finish_reason: str | None = None, logprobs: list | None = None,
               **extra) -> dict:
        choices = [{"index": index, "delta": delta, "logprobs": self._logprobs(logprobs),
                    "finish_reason": finish_reason}]
        return {"id": self.rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model,
                "choices": choices, **extra}

    def opening(self) -> list[dict]:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self.req.n)]

    def chunk(self, c: Completion, out: RequestOutput) -> dict | None:
        """The chunk for one decoder output of completion `c` (None: nothing to send)."""
        logprobs = token_logprobs(out) if self.req.logprobs and out.new_token_ids else None
        delta = {"content": out.new_text} if out.new_text else {}
        if out.finished:
            return self._chunk(c.index, delta, out.finish_reason, logprobs, **self.extra(c.token_ids))
        if delta or logprobs:
            return self._chunk(c.index, delta, logprobs=logprobs)
        return None

    def closing(self, c: Completion) -> dict:
        """Ends a completion the stream's error cut short."""
        return self._chunk(c.index, {}, "error")

    def usage_chunk(self, acc: Accumulator) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model,
                "choices": [], "usage": usage(acc.prompt_tokens, acc.completion_tokens)}

"""OpenAI chat-completion bodies and SSE chunks (`chat.completion`, `chat.completion.chunk`) rendered from an
Accumulator, with the `trim` and `token_ids` extensions; a completion that is a Llama 3.x tool call becomes
`tool_calls` (streamed: the call's text is held back until it ends, then sent as one tool_calls delta)."""

import time
import uuid

from pipeline.model.tools import parse_tool_calls
from pipeline.types import RequestOutput

from .api import ChatCompletionRequest
from .constraints import tool_dicts
from .responses import Accumulator, ChunkStream, Completion, TokenBytes, token_logprobs, usage
from .stream import TrimSummary


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calling(req: ChatCompletionRequest) -> tuple[set[str], bool]:
    """The functions a completion may call (none: its text is content), and whether the grammar forces a call."""
    tools = tool_dicts(req)
    names = {t["function"]["name"] for t in tools} if tools else set()
    return names, tools is not None and req.tool_choice not in (None, "auto")


def may_be_call(text: str, forced: bool) -> bool:
    """Whether a completion's text so far may still turn out to be a call (then it is held back, not streamed)."""
    head = text.lstrip()
    return forced or not head or head.startswith("{")


class ChatRenderer(ChunkStream):
    """One chat request's response: `body` for JSON, the rest for SSE (see responses.collect and responses.events)."""

    def __init__(self, req: ChatCompletionRequest, rid: str, model: str, trim: TrimSummary | None,
                 token_bytes: TokenBytes):
        self.req, self.rid, self.model, self.token_bytes = req, rid, model, token_bytes
        self.trim = trim.as_dict() if trim else None
        self.image_tokens = trim.visual_tokens if trim else 0
        options = req.stream_options
        self.include_usage = bool(options and options.include_usage)
        self.continuous_usage = bool(options and options.continuous_usage_stats)
        self.tool_names, self.forced = tool_calling(req)
        self.as_content: set[int] = set()  # streamed completions known to be text, not a call

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
        out = usage(prompt_tokens, completion_tokens, cached_tokens)
        out["prompt_tokens_details"]["image_tokens"] = self.image_tokens
        return out

    def _message(self, c: Completion) -> tuple[dict, str | None]:
        """The assistant message and finish reason of a finished completion: its tool calls, or its text."""
        calls = parse_tool_calls(c.text, self.tool_names) if self.tool_names else None
        if not calls:
            return {"role": "assistant", "content": c.text}, c.finish_reason
        tool_calls = [{"id": call_id(), "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}} for call in calls]
        return {"role": "assistant", "content": None, "tool_calls": tool_calls}, "tool_calls"

    def extra(self, token_ids, done: Completion | None = None) -> dict:
        """The response's extensions; `trim` with what shedding left the finished completion `done` (kept at
        admission: kept_tokens; at the end: kept_tokens_end; shed_at: the output token from which it changed)."""
        trim = self.trim
        if trim is not None and done is not None and done.kept_tokens_end is not None:
            trim = {**trim, "kept_tokens_end": done.kept_tokens_end, "shed_at": done.shed_at}
        extra = {"trim": trim}
        if self.req.return_token_ids:
            extra["token_ids"] = token_ids
        return extra

    def _logprobs(self, rows) -> dict | None:
        return {"content": self.token_bytes.entries(rows)} if rows is not None else None

    def body(self, acc: Accumulator) -> dict:
        choices = []
        for c in acc.completions:
            message, finish_reason = self._message(c)
            choices.append({"index": c.index, "message": message, "finish_reason": finish_reason,
                            "logprobs": self._logprobs(c.logprobs if self.req.logprobs else None)})
        token_ids = [c.token_ids for c in acc.completions]
        scores = {}
        if self.req.prompt_logprobs is not None:  # vLLM's extension, beside the choices
            scores["prompt_logprobs"] = self.token_bytes.prompt_logprobs(acc.prompt_logprobs or [])
        return {
            "id": self.rid, "object": "chat.completion", "created": int(time.time()), "model": self.model,
            "choices": choices, "usage": self.usage(acc.prompt_tokens, acc.completion_tokens, acc.cached_tokens),
            **self.extra(token_ids[0] if len(token_ids) == 1 else token_ids, acc.completions[0]), **scores,
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
        extra = {"usage": self.usage(out.prompt_tokens, c.completion_tokens, out.cached_tokens)} if self.continuous_usage else {}
        if self.tool_names and c.index not in self.as_content:
            return self._held(c, out, extra)
        logprobs = token_logprobs(out) if self.req.logprobs and out.new_token_ids else None
        delta = {"content": out.new_text} if out.new_text else {}
        if out.finished:
            return self._chunk(c.index, delta, out.finish_reason, logprobs, **self.extra(c.token_ids, c), **extra)
        if delta or logprobs:
            return self._chunk(c.index, delta, logprobs=logprobs, **extra)
        return None

    def _held(self, c: Completion, out: RequestOutput, extra: dict) -> dict | None:
        """While a completion may be a tool call its text is held; sent as tool_calls or as text once it is known."""
        logprobs = c.logprobs if self.req.logprobs else None  # everything held so far
        if out.finished:
            message, finish_reason = self._message(c)
            delta = ({"tool_calls": [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]}
                     if message.get("tool_calls") else {"content": c.text})
            return self._chunk(c.index, delta, finish_reason, logprobs, **self.extra(c.token_ids, c), **extra)
        if may_be_call(c.text, self.forced):
            return None
        self.as_content.add(c.index)  # plain text after all: what was held goes out now, the rest as it comes
        return self._chunk(c.index, {"content": c.text}, logprobs=logprobs, **extra)

    def closing(self, c: Completion) -> dict:
        """Ends a completion the stream's error cut short."""
        return self._chunk(c.index, {}, "error")

    def usage_chunk(self, acc: Accumulator) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model,
                "choices": [], "usage": self.usage(acc.prompt_tokens, acc.completion_tokens, acc.cached_tokens)}

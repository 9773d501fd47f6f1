"""The Responses API's `response` object and its SSE events (response.created ... response.completed, with
sequence numbers) rendered from the chat path's Accumulator: text as a message item, a Llama 3.x call as
function_call items."""

import json
import time
import uuid

from pipeline.model.tools import parse_tool_calls
from pipeline.types import RequestOutput

from .api import ChatCompletionRequest
from .chat import call_id, may_be_call, tool_calling
from .responses import Accumulator, Completion, TokenBytes, TokenLogprob, token_logprobs
from .responses_api import NamedFunction
from .stream import StageError, TrimSummary


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


class ResponsesRenderer:
    """One request's `response` object (`body`) and its SSE events (the Renderer of responses.collect and
    responses.events). Text streams as output_text deltas; a completion that may be a tool call is held until it is
    known, then sent as function_call items (a call) or as text."""

    def __init__(self, req, chat: ChatCompletionRequest, rid: str, model: str, trim: TrimSummary | None,
                 token_bytes: TokenBytes):
        self.req, self.rid, self.model, self.token_bytes = req, rid, model, token_bytes
        self.trim = trim.as_dict() if trim else None
        self.image_tokens = trim.visual_tokens if trim else 0
        self.logprobs = chat.logprobs
        self.tool_names, self.forced = tool_calling(chat)
        self.created_at = int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.seq = 0  # sequence_number of the next event
        self.as_text = not self.tool_names  # known to be text (streamed as it comes), not a call
        self.text_open = False  # the message item and its output_text part announced
        self.output: list[dict] | None = None  # the finished output items (ids stay those the stream sent)
        self.failed = False

    # ---- the response object

    def usage(self, acc: Accumulator) -> dict:
        return {"input_tokens": acc.prompt_tokens, "output_tokens": acc.completion_tokens,
                "total_tokens": acc.prompt_tokens + acc.completion_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0,
                                         "image_tokens": self.image_tokens},
                "output_tokens_details": {"reasoning_tokens": 0}}

    def response(self, status: str, output: list[dict], acc: Accumulator | None = None, **fields) -> dict:
        """The `response` object: the request's settings echoed, the output so far, usage once finished."""
        req, choice = self.req, self.req.tool_choice
        tools = [t.model_dump(by_alias=True, exclude_none=True) for t in req.tools or []]
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
        body = {
            "id": self.rid, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": output, "error": None, "incomplete_details": None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "top_logprobs": req.top_logprobs,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "tool_choice": choice.model_dump() if isinstance(choice, NamedFunction) else choice or "auto",
            "tools": tools,
            "text": {"format": fmt or {"type": "text"}}, "truncation": "disabled", "store": False,
            "background": False, "previous_response_id": None, "reasoning": None, "metadata": req.metadata,
            "user": req.user, "usage": self.usage(acc) if acc else None, "trim": self.trim, **fields,
        }
        if acc is not None and req.return_token_ids:
            body["token_ids"] = acc.completions[0].token_ids
        return body

    def _final(self, acc: Accumulator) -> dict:
        (c,) = acc.completions
        output = self._finished(c)
        if c.finish_reason == "length":
            return self.response("incomplete", output, acc, completed_at=int(time.time()),
                                 incomplete_details={"reason": "max_output_tokens"})
        return self.response("completed", output, acc, completed_at=int(time.time()))

    def body(self, acc: Accumulator) -> dict:
        return self._final(acc)

    # ---- output items

    def _text_part(self, text: str, rows: list[TokenLogprob] | None) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": self._entries(rows)}

    def _entries(self, rows: list[TokenLogprob] | None) -> list[dict]:
        return self.token_bytes.entries(rows) if self.logprobs and rows else []

    def _message(self, status: str, content: list[dict]) -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def _finished(self, c: Completion) -> list[dict]:
        """The output items of the finished completion: its function calls, or one message holding its text."""
        if self.output is None:
            calls = parse_tool_calls(c.text, self.tool_names) if not self.as_text else None
            status = "incomplete" if c.finish_reason == "length" else "completed"
            self.output = ([{"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id(),
                             "name": call.name, "arguments": call.arguments, "status": "completed"} for call in calls]
                           if calls else [self._message(status, [self._text_part(c.text, c.logprobs)])])
        return self.output

    # ---- SSE

    def frame(self, event: dict) -> str:
        event["sequence_number"] = self.seq
        self.seq += 1
        return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"

    def opening(self) -> list[dict]:
        return [{"type": "response.created", "response": self.response("in_progress", [])},
                {"type": "response.in_progress", "response": self.response("in_progress", [])}]

    def _where(self) -> dict:
        return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    def _open_text(self) -> list[dict]:
        if self.text_open:
            return []
        self.text_open = True
        return [{"type": "response.output_item.added", "output_index": 0, "item": self._message("in_progress", [])},
                {"type": "response.content_part.added", **self._where(), "part": self._text_part("", None)}]

    def _delta(self, text: str, rows: list[TokenLogprob]) -> list[dict]:
        if not (text or self._entries(rows)):
            return []
        return [{"type": "response.output_text.delta", **self._where(), "delta": text, "logprobs": self._entries(rows)}]

    def _close(self, c: Completion) -> list[dict]:
        """The events that end the output: the message's text done, or each function call as one arguments delta."""
        items = self._finished(c)
        if items[0]["type"] == "message":
            part = items[0]["content"][0]
            return [*self._open_text(),
                    {"type": "response.output_text.done", **self._where(), "text": part["text"],
                     "logprobs": part["logprobs"]},
                    {"type": "response.content_part.done", **self._where(), "part": part},
                    {"type": "response.output_item.done", "output_index": 0, "item": items[0]}]
        events = []
        for i, item in enumerate(items):
            where = {"item_id": item["id"], "output_index": i}
            events += [{"type": "response.output_item.added", "output_index": i,
                        "item": {**item, "arguments": "", "status": "in_progress"}},
                       {"type": "response.function_call_arguments.delta", **where, "delta": item["arguments"]},
                       {"type": "response.function_call_arguments.done", **where, "name": item["name"],
                        "arguments": item["arguments"]},
                       {"type": "response.output_item.done", "output_index": i, "item": item}]
        return events

    def chunk(self, c: Completion, out: RequestOutput) -> list[dict]:
        if not self.as_text:
            if out.finished:
                return self._close(c)
            if may_be_call(c.text, self.forced):
                return []  # held: it may still be a call
            self.as_text = True  # text after all: what was held goes out now, the rest as it comes
            return self._open_text() + self._delta(c.text, c.logprobs)
        events = self._open_text() + self._delta(out.new_text, token_logprobs(out) if out.new_token_ids else [])
        return events + (self._close(c) if out.finished else [])

    def failure(self, error: StageError, acc: Accumulator) -> list[dict]:
        """An error after the 200: an `error` event, then response.failed with the text so far."""
        self.failed = True
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        (c,) = acc.completions
        output = [self._message("incomplete", [self._text_part(c.text, c.logprobs)])] if self.text_open else []
        return [{"type": "error", "code": code, "message": error.message, "param": None},
                {"type": "response.failed", "response": self.response(
                    "failed", output, acc, error={"code": code, "message": error.message})}]

    def ending(self, acc: Accumulator) -> list[str]:
        if self.failed:
            return []
        final = self._final(acc)
        return [self.frame({"type": f"response.{final['status']}", "response": final})]


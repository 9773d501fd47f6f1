"""The ingress's one validation layer: what a parsed request carries, checked before any stage runs (text that is not
Unicode, tool-call arguments that are not JSON objects, token ids outside the vocabulary, sizes, the output
constraint); each refusal is an InvalidRequest naming the field (`param`, OpenAI's error shape). One function per
concern, each taking the parsed request or the part it checks, so a new endpoint plugs in: `check_request` first,
then what it carries (`check_sampling`, `check_token_ids`, `check_text_size`), then `sampling_params`."""

import asyncio
import json
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from pipeline.engine.sampling import SamplingParams
from pipeline.errors import InvalidRequest

from . import api
from .api import field_path
from .constraints import structured_output


@dataclass(frozen=True)
class Vocab:
    """The token ids a request may name: [0, size) less the ones the model never emits (Llama-3.2-Vision's
    <|image|> is the tokenizer's last id and has no logit column)."""

    size: int
    never_emitted: frozenset[int] = frozenset()

    def bad(self, ids) -> list[int]:
        return [t for t in ids if not 0 <= t < self.size]

    def bad_output(self, ids) -> list[int]:
        return [t for t in ids if not 0 <= t < self.size or t in self.never_emitted]


def _is_unicode(text: str) -> bool:
    """False for text with a lone surrogate (a JSON escape such as "\\ud800" parses to one; UTF-8 cannot hold it)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_text(value, root: tuple = ()) -> None:
    """Every string anywhere in `value` (a request model, its dicts and lists, keys too) is Unicode; else an
    InvalidRequest naming the first bad field. Iterative: a deeply nested value cannot exhaust the stack.
    Control characters, noncharacters and the like are text and pass: the tokenizer and the template take them."""
    if isinstance(value, BaseModel):
        try:
            value.model_dump_json()  # one pass in Rust (~7x the walk below): it fails on a lone surrogate
            return
        except PydanticSerializationError:
            pass  # find the field
    stack = [(value, root)]
    while stack:
        obj, path = stack.pop()
        if isinstance(obj, str):
            if not _is_unicode(obj):
                where = field_path(path)
                raise InvalidRequest(f"{where}: the text is not valid Unicode (a lone surrogate)", param=where)
        elif isinstance(obj, BaseModel):
            fields = type(obj).model_fields
            items = [(f.alias or name, getattr(obj, name)) for name, f in fields.items()]
            items += list((obj.model_extra or {}).items())
            stack += [(v, path + (name,)) for name, v in reversed(items) if v is not None]
        elif isinstance(obj, dict):
            for key, v in reversed(list(obj.items())):
                if isinstance(key, str) and not _is_unicode(key):
                    where = field_path(path)
                    raise InvalidRequest(f"{where}: a key is not valid Unicode (a lone surrogate)", param=where)
                stack.append((v, path + (str(key),)))
        elif isinstance(obj, (list, tuple)):
            stack += [(v, path + (i,)) for i, v in reversed(list(enumerate(obj)))]


def check_tool_calls(messages: list, root: str = "messages") -> None:
    """Earlier assistant tool calls: `function.arguments` must be a JSON object (the template renders it parsed)."""
    for i, m in enumerate(messages):
        for j, call in enumerate(getattr(m, "tool_calls", None) or []):
            where = f"{root}[{i}].tool_calls[{j}].function.arguments"
            try:
                args = json.loads(call.function.arguments)
            except ValueError:
                raise InvalidRequest(f"{where}: not JSON (a tool call's arguments are a JSON object)",
                                     param=where) from None
            if not isinstance(args, dict):
                raise InvalidRequest(f"{where}: a tool call's arguments are a JSON object, not "
                                     f"{type(args).__name__}", param=where)


def check_request(req: BaseModel) -> None:
    """What every endpoint checks first, whatever its body: all its text, and its messages' tool calls."""
    check_text(req)
    messages = getattr(req, "messages", None)
    if isinstance(messages, list):
        check_tool_calls(messages)


def check_text_size(text: str, max_chars: int, field: str) -> None:
    if len(text) > max_chars:
        raise InvalidRequest(f"{field}: {len(text)} characters; the limit is {max_chars}", param=field)


def check_token_ids(ids: list[int], vocab: Vocab, field: str, max_count: int | None = None) -> None:
    """Token ids a request sends (a prompt, /detokenize's): at most `max_count`, each in the vocabulary."""
    if max_count is not None and len(ids) > max_count:
        raise InvalidRequest(f"{field}: {len(ids)} token ids; the limit is {max_count}", param=field)
    bad = vocab.bad(ids)
    if bad:
        raise InvalidRequest(f"{field}: token ids {bad[:5]} are outside the vocabulary [0, {vocab.size})",
                             param=field)


def check_sampling(req: api.Sampling, vocab: Vocab) -> None:
    """Token ids among the sampling fields (logit_bias, stop_token_ids) are ones the model can emit."""
    for field, ids in (("logit_bias", list(req.logit_bias or {})), ("stop_token_ids", req.stop_token_ids or [])):
        bad = vocab.bad_output(ids)
        if bad:
            raise InvalidRequest(f"{field}: token ids {bad[:5]} are not ones the model emits (the vocabulary is "
                                 f"[0, {vocab.size}){' less the image token' if vocab.never_emitted else ''})",
                                 param=field)


async def sampling_params(req: api.Sampling, vocab: Vocab, default_max_tokens: int) -> SamplingParams:
    """A completion request checked whole and its SamplingParams, in a thread (the walk over a large body, and
    the constraint's grammar, take milliseconds to seconds). A constraint that can only end (a JSON boolean) with
    min_tokens or ignore_eos is served: the completion ends with finish_reason "stop" where the constraint allows
    nothing but the end (pipeline/engine/llm_engine.py; docs/validation.md)."""

    def checked():
        check_request(req)
        check_sampling(req, vocab)
        return api.to_sampling_params(req, default_max_tokens, structured_output(req))

    return await asyncio.to_thread(checked)

"""Llama 3.x's JSON tool calls: tools and tool turns written into the chat as Meta's Llama 3.1/3.2 template writes
them (the functions in the first user message), the grammar that forces a call, and a completion parsed back."""

import json
import re
from dataclasses import dataclass

# Meta's prompt for custom tools in the user turn (llama-models' Llama 3.1/3.2 "JSON based tool calling" format).
TOOL_PROMPT = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    "best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
    "Do not use variables.\n\n"
)
PYTHON_TAG = "<|python_tag|>"  # what Llama may put before a call; the detokenizer drops it, the parser allows it


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's function.arguments


def call_text(name: str, arguments: str | dict) -> str:
    """An earlier call as the assistant turn Llama 3.x wrote it."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return json.dumps({"name": name, "parameters": args})


def render_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """HF chat messages with tools written in: the functions (OpenAI's `tools` entries, each {"type": "function",
    "function": {...}}) before the first user message's text, an assistant's `tool_calls` as its JSON call, a
    `tool` message as an `ipython` turn holding {"output": ...}. A template without tool support renders the rest."""
    out, placed = [], not tools
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m = {"role": "assistant", "content": "".join(
                call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])}
        elif m["role"] == "tool":
            m = {"role": "ipython", "content": json.dumps({"output": _text(m["content"])})}
        elif m["role"] == "user" and not placed:
            preamble = TOOL_PROMPT + "".join(json.dumps(t, indent=4) + "\n\n" for t in tools)
            m["content"] = _prefixed(m["content"], preamble)
            placed = True
        out.append(m)
    return out


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content or [])


def _prefixed(content, preamble: str):
    """The preamble before the message's text, after its images (Llama 3.2 Vision wants the images first)."""
    if isinstance(content, str):
        return preamble + content
    images = [p for p in content if p.get("type") == "image"]
    return images + [{"type": "text", "text": preamble + _text(content)}]


def call_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON schema of one call: of function `name`, or of any of `tools` (tool_choice "required")."""
    choices = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not choices:
        raise KeyError(name)
    schemas = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                 "parameters": f.get("parameters") or {"type": "object"}},
                "required": ["name", "parameters"], "additionalProperties": False} for f in choices]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


_SEPARATOR = re.compile(r"\s*;\s*")


def parse_tool_calls(text: str, names: set[str]) -> list[ToolCall] | None:
    """The calls a completion makes (Llama 3.x JSON: {"name": ..., "parameters": {...}}, several separated by ";"),
    or None when the text is not a call to one of `names` (then it is the message's content)."""
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return None
    try:
        decoded = [json.loads(body)]
    except ValueError:
        try:
            decoded = [json.loads(p) for p in _SEPARATOR.split(body) if p]
        except ValueError:
            return None
    calls = []
    for d in decoded:
        if not isinstance(d, dict) or d.get("name") not in names:
            return None
        args = d.get("parameters", d.get("arguments", {}))
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(d["name"], json.dumps(args)))
    return calls

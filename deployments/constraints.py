"""A request's one output constraint as a StructuredOutput: OpenAI's response_format, vLLM's structured_outputs or
guided_* fields, or a call forced by tool_choice ("required" or a named function)."""

from contextlib import contextmanager

from pipeline.engine.structured import StructuredOutput
from pipeline.errors import InvalidRequest
from pipeline.model.tools import call_schema

from .api import JsonObjectFormat, JsonSchemaResponseFormat, Sampling


def structured_output(req: Sampling) -> StructuredOutput | None:
    """The one constraint a request puts on its output: response_format, structured_outputs, a guided_* field, or
    a forced tool call (tool_choice required or named); more than one is a 400. The spec is checked here (a bad
    schema, regex or grammar is a 400 before the request goes anywhere)."""
    found: dict[str, StructuredOutput] = {}
    fmt = getattr(req, "response_format", None)
    if isinstance(fmt, JsonObjectFormat):
        found["response_format"] = StructuredOutput(kind="json_object")
    elif isinstance(fmt, JsonSchemaResponseFormat):
        found["response_format"] = StructuredOutput.json_schema(fmt.json_schema.schema_ or {"type": "object"})
    so = req.structured_outputs
    specs = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
             "json_object": so.json_object or None} if so else {}
    specs = {f"structured_outputs.{k}": v for k, v in specs.items() if v is not None}
    specs.update({k: getattr(req, k) for k in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                  if getattr(req, k) is not None})
    for field, value in specs.items():
        kind = field.rsplit(".", 1)[-1].removeprefix("guided_")
        with naming(field):
            found[field] = (StructuredOutput.json_schema(value) if kind == "json" else
                            StructuredOutput.choice(value) if kind == "choice" else
                            StructuredOutput(kind="json_object") if kind == "json_object" else
                            StructuredOutput(kind=kind, spec=value))
    tool = forced_tool_call(req)
    if tool is not None:
        found["tool_choice"] = tool
    if so is not None and not any(k.startswith("structured_outputs.") for k in found):
        raise InvalidRequest("structured_outputs needs one of json, regex, choice, grammar, json_object",
                             param="structured_outputs")
    if len(found) > 1:
        raise InvalidRequest(f"one output constraint a request; this one has {', '.join(found)}",
                             param=list(found)[1])
    for field, spec in found.items():
        with naming(field):
            spec.grammar()  # InvalidRequest naming what is wrong with it
        return spec
    return None


@contextmanager
def naming(field: str):
    """An InvalidRequest raised inside names `field` (the request field that carried the spec)."""
    try:
        yield
    except InvalidRequest as exc:
        raise InvalidRequest(f"{field}: {exc}", param=field) from None


def tool_dicts(req: Sampling) -> list[dict] | None:
    """The request's tools as the template renders them, when the model may call one (tool_choice not "none")."""
    tools = getattr(req, "tools", None)
    if not tools or req.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in tools]


def forced_tool_call(req: Sampling) -> StructuredOutput | None:
    """tool_choice "required" or a named function: the output is constrained to a call (Llama 3.x JSON)."""
    tools, choice = tool_dicts(req), getattr(req, "tool_choice", None)
    if tools is None or choice in (None, "auto"):
        return None
    return StructuredOutput.json_schema(call_schema(tools, None if choice == "required" else choice.function.name))

"""The field policy: what this server does with every field of OpenAI's chat completions, text completions and
Responses requests and of vLLM's documented extras. A field is implemented, accepted and ignored (it cannot change the
output), accepted only at the value that is this server's behaviour, or refused with a 400 that names it and says why.
The request models are built from these tables (deployments/api.py, deployments/responses_api.py), docs/api.md's table
is rendered from them, and the tests hold them against the openai SDK's own list of fields."""

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, create_model, model_validator

Kind = Literal["implemented", "ignored", "default", "refused"]


@dataclass(frozen=True)
class FieldPolicy:
    kind: Kind
    note: str
    default: Any = None  # kind "default": the one value accepted besides null

    def problem(self, name: str, value: Any) -> str | None:
        """Why `value` is refused, or None."""
        if value is None or self.kind in ("implemented", "ignored"):
            return None
        if self.kind == "default":
            return None if value == self.default else f"{name}={value!r} is not supported ({self.note})"
        return f"{name} is not supported ({self.note})"


def done(note: str) -> FieldPolicy:
    return FieldPolicy("implemented", note)


def ignored(note: str) -> FieldPolicy:
    return FieldPolicy("ignored", note)


def only(default: Any, note: str) -> FieldPolicy:
    return FieldPolicy("default", note, default)


def refused(note: str) -> FieldPolicy:
    return FieldPolicy("refused", note)


BOTH = {  # both endpoints: OpenAI's sampling fields, vLLM's sampling extras, the trim extension
    "temperature": done("0 is greedy; 0 < t < 1e-5 is a 400"),
    "top_p": done("nucleus sampling"),
    "seed": done("per-completion generator: completion i is seeded seed + i"),
    "stop": done("strings; the text is cut before the first one"),
    "n": done("completions sharing the prompt's and the image's KV pages"),
    "presence_penalty": done("-2..2, subtracted once from every token already generated"),
    "frequency_penalty": done("-2..2, subtracted per occurrence of a generated token"),
    "logit_bias": done("token id -> -100..100 added to its logit"),
    "max_tokens": done("default: the deployment's default_max_tokens, capped by the context; 0 with echo or "
                       "prompt_logprobs: the prompt scored, nothing generated"),
    "stream": done("SSE"),
    "stream_options": done("include_usage; continuous_usage_stats (usage on every chunk)"),
    "user": ignored("an end-user id for abuse tracking; no effect on the output"),
    "top_k": done("vLLM: keep the k likeliest tokens (0 or -1: off)"),
    "min_p": done("vLLM: drop tokens below min_p x the likeliest one's probability"),
    "repetition_penalty": done("vLLM: > 1 divides positive (multiplies negative) logits of prompt and output tokens"),
    "min_tokens": done("vLLM: no end-of-sequence or stop token before this many tokens"),
    "stop_token_ids": done("vLLM: these tokens end the completion (not part of its text)"),
    "ignore_eos": done("vLLM: generate to max_tokens (benchmarks)"),
    "structured_outputs": done("vLLM: one of json, regex, choice, grammar, json_object (xgrammar)"),
    "guided_json": done("vLLM (older): as structured_outputs.json"),
    "guided_regex": done("vLLM (older): as structured_outputs.regex"),
    "guided_choice": done("vLLM (older): as structured_outputs.choice"),
    "guided_grammar": done("vLLM (older): as structured_outputs.grammar (xgrammar's EBNF)"),
    "guided_decoding_backend": ignored("vLLM: the backend is always xgrammar"),
    "guided_whitespace_pattern": refused("JSON is generated with fixed separators"),
    "use_beam_search": only(False, "no beam search; sampling or greedy"),
    "best_of": only(1, "no beam search; ask for n completions instead"),
    "length_penalty": only(1.0, "applies to beam search only"),
    "include_stop_str_in_output": only(False, "the text is cut before a stop string"),
    "skip_special_tokens": only(True, "special tokens never appear in the text"),
    "spaces_between_special_tokens": only(True, "special tokens never appear in the text"),
    "truncate_prompt_tokens": refused("prompts are never truncated; one past the limit is a 400"),
    "truncation_side": ignored("only with truncate_prompt_tokens, which is refused"),
    "prompt_logprobs": done("vLLM: 0..20; each prompt token's logprob, rank and top k (the first: null); not with "
                            "stream. Image prompts: the trimmed model's"),
    "allowed_token_ids": refused("not implemented; a regex or choice constrains the output instead"),
    "bad_words": refused("not implemented; logit_bias -100 bans single tokens"),
    "logprob_token_ids": refused("not implemented; top_logprobs returns the likeliest tokens"),
    "logits_processors": refused("no custom code runs in the sampler"),
    "watermarking": refused("no watermarking"),
    "repetition_detection": refused("not implemented"),
    "thinking_token_budget": refused("the model does not reason"),
    "priority": ignored("vLLM: scheduling order only (this engine admits first come, first served)"),
    "request_id": ignored("vLLM: the server makes its own id"),
    "session_id": ignored("vLLM: routing hint"),
    "cache_salt": done("vLLM: only requests with the same salt share prefix-cached pages"),
    "stream_interval": ignored("vLLM: how many tokens a chunk groups; every token is sent as it comes"),
    "kv_transfer_params": refused("no disaggregated KV transfer"),
    "ec_transfer_params": refused("no disaggregated encoder cache"),
    "vllm_xargs": refused("no custom extensions"),
    "return_tokens_as_token_ids": refused("tokens in logprobs are text and bytes"),
    "return_token_ids": done("the response carries the completion's token ids (token_ids)"),
    "trim": done("crosstrim: the request's trimming ({\"k_ratio\": R}, {\"enabled\": false}, a policy)"),
}

CHAT = {
    "messages": done("system, developer (as system), user, assistant (text, tool_calls), tool; text and image parts"),
    "model": done("the served model's name, or omitted"),
    "max_completion_tokens": done("as max_tokens"),
    "logprobs": done("the model's log-probabilities of each token, OpenAI's shape"),
    "top_logprobs": done("0..20 alternatives per token (with logprobs)"),
    "response_format": done("text, json_object, json_schema (strict or not: always enforced), via xgrammar"),
    "tools": done("functions, rendered in Llama 3.x's JSON tool-call prompt"),
    "tool_choice": done("none, auto (parsed), required and a named function (enforced by a grammar)"),
    "parallel_tool_calls": ignored("Llama 3.2's format holds one call per turn; at most one call is returned"),
    **BOTH,
    "store": ignored("OpenAI stores completions for its dashboard; nothing is stored here"),
    "metadata": ignored("tags for OpenAI's stored completions"),
    "service_tier": ignored("OpenAI's billing tier"),
    "safety_identifier": ignored("an end-user id for abuse tracking"),
    "prompt_cache_key": ignored("a cache routing hint; no effect on the output"),
    "prompt_cache_retention": ignored("a cache retention hint; no effect on the output"),
    "prompt_cache_options": ignored("cache hints; no effect on the output"),
    "prediction": ignored("predicted output only speeds up OpenAI's decoding; it cannot change the output"),
    "reasoning_effort": ignored("the model does not reason; its template takes no effort setting"),
    "include_reasoning": ignored("vLLM: the model does not reason"),
    "modalities": only(["text"], "text output only"),
    "audio": refused("no audio output"),
    "verbosity": refused("not implemented; ask for brevity in the prompt and bound max_tokens"),
    "web_search_options": refused("no web search"),
    "moderation": refused("no moderation service"),
    "functions": refused("deprecated by OpenAI; send tools"),
    "function_call": refused("deprecated by OpenAI; send tool_choice"),
    "structural_tag": refused("not implemented; send structured_outputs or response_format"),
    "echo": only(False, "the response never repeats the prompt"),
    "add_generation_prompt": only(True, "the assistant header is always added"),
    "continue_final_message": only(False, "the conversation always gets a new assistant turn"),
    "add_special_tokens": only(False, "the chat template adds the special tokens"),
    "documents": refused("the chat template has no documents (RAG) section"),
    "chat_template": refused("the checkpoint's own template only"),
    "chat_template_kwargs": refused("the checkpoint's own template only"),
    "media_io_kwargs": refused("images are decoded one way"),
    "mm_processor_kwargs": refused("the processor runs with the checkpoint's settings"),
}

COMPLETIONS = {
    "prompt": done("a string, token ids, or a list of either (choice i * n + j is prompt i's completion j)"),
    "model": done("the served model's name, or omitted"),
    "logprobs": done("0..5: the sampled token's log-probability and this many alternatives"),
    **BOTH,
    "echo": done("the prompt's text before the completion; with logprobs, its tokens' logprobs (the first: null)"),
    "suffix": refused("no fill-in-the-middle"),
    "add_special_tokens": only(True, "a text prompt is tokenised with <|begin_of_text|>"),
}

PART = {  # fields of a message content part
    "type": done("text or image_url; input_audio and file are refused"),
    "text": done("a text part's text"),
    "image_url": done("{url, detail}: data: PNG/JPEG/WebP, s3:// from s3_buckets, http(s) from http_allowlist"),
    "uuid": ignored("aiperf: the client's id for a media item; the image is keyed by its bytes"),
    "prompt_cache_breakpoint": ignored("a cache hint; no effect on the output"),
}

MESSAGE = {  # fields of a message
    "role": done("system, developer (rendered as system), user, assistant, tool"),
    "content": done("a string or a list of parts (assistant: may be null with tool_calls)"),
    "name": ignored("a participant's name; the template has no place for it"),
    "tool_calls": done("assistant: earlier calls, rendered as Llama 3.x JSON"),
    "tool_call_id": ignored("tool: which call this answers; Llama's format has one call per turn"),
    "refusal": ignored("assistant: an earlier refusal message"),
    "reasoning_content": ignored("the model does not reason"),
    "audio": refused("no audio"),
    "function_call": refused("deprecated by OpenAI; send tool_calls"),
}

STATELESS = "this server keeps no state: nothing is stored; send the whole conversation as input"

RESPONSES = {  # POST /v1/responses, stateless like vLLM's default
    "input": done("a string, or items: messages (text and image parts), function_call and function_call_output"),
    "instructions": done("a system message before the input"),
    "model": done("the served model's name, or omitted"),
    "max_output_tokens": done("as chat's max_tokens"),
    "text": done("format: text, json_object, json_schema (strict or not: always enforced), via xgrammar"),
    "tools": done("function tools ({type, name, description, parameters}), in Llama 3.x's JSON tool-call prompt"),
    "tool_choice": done("none, auto (parsed), required and {type: function, name} (enforced by a grammar)"),
    "include": done("message.output_text.logprobs (the output's log-probabilities); any other value is a 400"),
    "top_logprobs": done("0..20 alternatives per token (with include message.output_text.logprobs)"),
    "stream": done("SSE with the Responses event types (response.created ... response.completed)"),
    "stream_options": ignored("include_obfuscation: OpenAI's padding of events against side channels"),
    "parallel_tool_calls": ignored("Llama 3.2's format holds one call per turn"),
    "store": only(False, STATELESS),
    "previous_response_id": refused(STATELESS),
    "conversation": refused(STATELESS),
    "background": only(False, "no background responses: " + STATELESS),
    "background_options": ignored("only with background, which is refused"),
    "context_management": refused("no stored context to compact; " + STATELESS),
    "prompt": refused("no stored prompt templates"),
    "truncation": only("disabled", "prompts are never truncated; one past the limit is a 400"),
    "max_tool_calls": ignored("a cap on built-in tool calls; this server has no built-in tools"),
    "reasoning": ignored("the model does not reason"),
    "moderation": refused("no moderation service"),
    "image": ignored("OpenAI's image context options; crosstrim's own is the trim extension"),
    "access_programs": ignored("OpenAI's access programs"),
    "metadata": ignored("tags for OpenAI's stored responses"),
    "user": ignored("an end-user id for abuse tracking; no effect on the output"),
    "safety_identifier": ignored("an end-user id for abuse tracking"),
    "service_tier": ignored("OpenAI's billing tier"),
    "prompt_cache_key": ignored("a cache routing hint; no effect on the output"),
    "prompt_cache_retention": ignored("a cache retention hint; no effect on the output"),
    "prompt_cache_options": ignored("cache hints; no effect on the output"),
    # vLLM's Responses extras and the sampling fields both completion endpoints have, mapped onto chat's
    **{name: p for name, p in BOTH.items() if name not in (
        "max_tokens", "n", "stream", "stream_options", "user", "prompt_logprobs", "truncate_prompt_tokens",
        "truncation_side")},
    "media_io_kwargs": refused("images are decoded one way"),
    "mm_processor_kwargs": refused("the processor runs with the checkpoint's settings"),
    "enable_response_messages": refused("vLLM's raw messages are not returned"),
    "previous_input_messages": refused("vLLM's harmony messages; send the conversation as input"),
}

RESPONSES_ITEM = {  # fields of a Responses input item: a message, a function_call or a function_call_output
    "type": done("message (the default), function_call, function_call_output; other item types are a 400"),
    "role": done("user, system, developer (rendered as system), assistant"),
    "content": done("a string or a list of parts"),
    "call_id": done("function_call and its function_call_output: the call's id (the assistant's tool_calls id)"),
    "name": done("function_call: the function called"),
    "arguments": done("function_call: a JSON object, rendered as Llama 3.x's call"),
    "output": done("function_call_output: a string or input_text parts, rendered as the ipython turn"),
    "id": ignored("an item's id in an earlier response"),
    "status": ignored("an item's status in an earlier response"),
    "phase": ignored("assistant: commentary or final answer; the template has no place for it"),
    "namespace": ignored("function_call: the function's namespace; Llama's format has none"),
    "caller": ignored("function_call: programmatic tool calling's caller; calls here are direct"),
    "async": ignored("function_call: calls here are answered in order"),
}

RESPONSES_PART = {  # fields of a Responses message content part
    "type": done("input_text, input_image; assistant turns: output_text, refusal; input_file and input_audio are a 400"),
    "text": done("input_text and output_text: the text"),
    "image_url": done("data: PNG/JPEG/WebP, s3:// from s3_buckets, http(s) from http_allowlist (as chat)"),
    "refusal": done("an earlier refusal, rendered as the assistant's text"),
    "detail": ignored("low, high, auto, original: the processor decides the tiles"),
    "file_id": refused("no file storage; send image_url"),
    "annotations": ignored("citations of an earlier output_text"),
    "logprobs": ignored("log-probabilities of an earlier output_text"),
    "prompt_cache_breakpoint": ignored("a cache hint; no effect on the output"),
}

RESPONSES_TOOL = {  # fields of a Responses function tool (the flat shape)
    "type": done("function; built-in tools (web search, file search, computer use ...) are a 400"),
    "name": done("the function's name"),
    "description": done("what the function does, in the tool prompt"),
    "parameters": done("a JSON schema of the arguments object"),
    "strict": ignored("calls forced by tool_choice always follow the schema"),
    "output_schema": ignored("the function's output schema; its output is read as text"),
    "allowed_callers": ignored("programmatic tool calling; calls here are direct"),
    "defer_loading": ignored("tool search; every tool is in the prompt"),
    "async": ignored("calls here are answered in order"),
}

RESPONSES_TEXT = {  # fields of a Responses `text` object
    "format": done("text, json_object, json_schema ({name, schema, description, strict})"),
    "verbosity": refused("not implemented; ask for brevity in the prompt and bound max_output_tokens"),
}

TABLES = {"chat completions": CHAT, "completions": COMPLETIONS, "message": MESSAGE, "content part": PART,
          "responses": RESPONSES, "responses input item": RESPONSES_ITEM, "responses content part": RESPONSES_PART,
          "responses tool": RESPONSES_TOOL, "responses text": RESPONSES_TEXT}


def with_policy(base: type[BaseModel], table: dict[str, FieldPolicy], name: str, whole: bool = True) -> type[BaseModel]:
    """`base` plus one declared field (default null, described) for each non-implemented entry of `table`, checked:
    a refused field set, or a default-only one set to another value, is a validation error that names it. `whole`:
    the table covers the model, so every implemented field must be one of `base`'s (the two cannot drift apart)."""
    missing = [name for name, p in table.items() if p.kind == "implemented" and name not in base.model_fields]
    assert not (whole and missing), f"{base.__name__} lacks implemented fields {missing}"
    declared = {name: (Any, Field(None, description=f"{p.kind}: {p.note}"))
                for name, p in table.items() if p.kind != "implemented" and name not in base.model_fields}

    def check(self):
        problems = [why for name, p in table.items() if (why := p.problem(name, getattr(self, name, None)))]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    return create_model(name, __base__=base, __module__=base.__module__, __doc__=base.__doc__,
                        __validators__={"_field_policy": model_validator(mode="after")(check)}, **declared)


def markdown() -> str:
    """The field policy table of docs/api.md, rendered from the tables above (written there by scripts/field_table.py)."""
    rows = ["| request | field | policy | note |", "| --- | --- | --- | --- |"]
    for where, table in TABLES.items():
        for name, p in table.items():
            kind = f"only `{p.default!r}`" if p.kind == "default" else p.kind
            rows.append(f"| {where} | `{name}` | {kind} | {p.note.replace('|', '/')} |")
    return "\n".join(rows)

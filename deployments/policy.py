"""The field policy: what this server does with every field of OpenAI's chat and text completions requests and of
vLLM's documented extras. A field is implemented, accepted and ignored (it cannot change the output), accepted only
at the value that is this server's behaviour, or refused with a 400 that names it and says why. The request models
are built from these tables (deployments/api.py), the README's table is rendered from them, and the tests hold
them against the openai SDK's own list of fields."""

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
    "max_tokens": done("default: the deployment's default_max_tokens, capped by the context"),
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
    "prompt_logprobs": refused("the prompt's log-probabilities are not computed"),
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
    "prompt": done("a string or a list of token ids (one prompt a request)"),
    "model": done("the served model's name, or omitted"),
    "logprobs": done("0..5: the sampled token's log-probability and this many alternatives"),
    **BOTH,
    "echo": only(False, "the response never repeats the prompt"),
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

TABLES = {"chat completions": CHAT, "completions": COMPLETIONS, "message": MESSAGE, "content part": PART}


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
    """The README's field policy table, rendered from the tables above."""
    rows = ["| request | field | policy | note |", "| --- | --- | --- | --- |"]
    for where, table in TABLES.items():
        for name, p in table.items():
            kind = f"only `{p.default!r}`" if p.kind == "default" else p.kind
            rows.append(f"| {where} | `{name}` | {kind} | {p.note.replace('|', '/')} |")
    return "\n".join(rows)

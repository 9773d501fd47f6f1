"""Fuzz of every endpoint against the shared app with API keys and per-key limits (test_hardening.py's config):
strings from all of Unicode, tool-call messages, grammars with the sampling fields that fight them; 0 5xx."""

import json
import os
import threading

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.test_hardening import (  # noqa: F401 - app: the module's fixture; pytestmark: its config
    AUTH,
    KEYS,
    TIMEOUT,
    app,
    assert_healthy,
    assert_openai_error,
    chat,
    pytestmark,
    raw_post,
)

# ---------------------------------------------------------------- fuzz

_floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.0, 1e-300, 5e-324, 1e-40, 2.0, -1.0]))
_ints = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 2**63, 2**64, -(2**63) - 1]))
# All of Unicode: hypothesis' default text leaves out surrogates (category Cs), which a JSON escape can carry; the
# hostile ones are also drawn on purpose (a random draw seldom holds a lone surrogate or an escape sequence).
_HOSTILE = ["\ud800", "\udfff", "\ud83d", "\x00", "\x1b[31m", "\u202e", "\ufeff", "\uffff", "\U0010ffff", "\r\n",
            "%2e%2e/", "../", "<|eot_id|>", "<|image|>", "{", '"', "\\"]
_text = st.one_of(st.text(st.characters(exclude_categories=()), max_size=40),
                  st.lists(st.one_of(st.sampled_from(_HOSTILE), st.text(max_size=3)), max_size=5).map("".join))
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.one_of(
        _text, st.binary(max_size=300).map(lambda b: "data:image/png;base64," + __import__("base64").b64encode(
            b"\x89PNG\r\n\x1a\n" + b).decode())),
    })}),
    st.dictionaries(_text, st.none() | _text, max_size=2),
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", ""]),
     "content": st.one_of(_text, st.lists(_part, max_size=3), st.none(), st.integers())},
    optional={"tool_calls": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": _text, "arguments": st.one_of(_text, st.just('{"a": 1}'))})}), max_size=2), "tool_call_id": _text})
_schema = st.one_of(st.just({"type": "object", "properties": {"a": {"type": "integer", "maximum": 9}},
                             "required": ["a"]}), st.dictionaries(_text, st.one_of(_text, _ints), max_size=2),
                    st.just({"type": "nonsense"}), _text)
_tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "x"]), "function": st.fixed_dictionaries(
    {"name": st.one_of(st.just("f"), _text), "parameters": _schema})})
# Fields of the field policy (deployments/policy.py): implemented, ignored, default-only and refused ones.
_policy_fields = {
    "presence_penalty": _floats, "frequency_penalty": _floats, "repetition_penalty": _floats, "min_p": _floats,
    "min_tokens": _ints, "logit_bias": st.dictionaries(st.one_of(_text, _ints.map(str)), _floats, max_size=3),
    "stop_token_ids": st.lists(_ints, max_size=3), "store": st.booleans(), "metadata": st.dictionaries(_text, _text),
    "parallel_tool_calls": st.booleans(), "audio": st.none() | st.just({"voice": "x"}), "echo": st.booleans(),
    "response_format": st.one_of(st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "x"}]),
                                 _schema.map(lambda s: {"type": "json_schema", "json_schema": {"name": "n", "schema": s}})),
    "guided_json": _schema, "guided_regex": st.one_of(_text, st.just("[a-c]{2}")),
    "guided_choice": st.lists(_text, max_size=3), "structured_outputs": st.dictionaries(
        st.sampled_from(["json", "regex", "choice", "grammar", "json_object"]), st.one_of(_text, _schema), max_size=2),
    "tools": st.lists(_tool, max_size=2), "tool_choice": st.one_of(
        st.sampled_from(["none", "auto", "required", "x"]), st.just({"type": "function", "function": {"name": "f"}})),
}
_request = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(_message, min_size=0, max_size=3), _text)},
    optional={"max_tokens": _ints, "temperature": _floats, "top_p": _floats, "top_k": _ints, "seed": _ints,
              "stop": st.one_of(_text, st.lists(_text, max_size=3)), "n": _ints, "stream": st.booleans(),
              "trim": st.one_of(_text, st.dictionaries(st.sampled_from(["k_ratio", "policy", "mass", "enabled"]),
                                                       st.one_of(_floats, _text, st.booleans()), max_size=2)),
              "model": st.one_of(st.none(), _text), "ignore_eos": st.booleans(),
              "stream_options": st.dictionaries(st.sampled_from(["include_usage", "continuous_usage_stats"]),
                                                st.booleans()),
              **_policy_fields},
)
_text_request = st.fixed_dictionaries(
    {"prompt": st.one_of(_text, st.lists(_ints, max_size=4), st.lists(_text, max_size=2))},
    optional={"max_tokens": st.integers(-1, 8), "logprobs": _ints, "echo": st.booleans(), "suffix": _text,
              "stream": st.booleans(), **{k: v for k, v in _policy_fields.items() if k in (
                  "presence_penalty", "logit_bias", "min_tokens", "guided_regex", "stop_token_ids")}},
)
# Grammars that end after a few tokens (or never), with the fields that fight them: min_tokens, ignore_eos, n,
# stop_token_ids (the engine's stop tokens among them), stop strings.
_grammar = st.sampled_from([
    {"response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}}},
    {"response_format": {"type": "json_object"}}, {"guided_choice": ["yes", "no"]}, {"guided_regex": "[a-c]{1,3}"},
    {"guided_regex": "a*"}, {"guided_json": {"type": "integer", "minimum": 0, "maximum": 3}},
    {"guided_grammar": 'root ::= "x" | "y"'}, {"structured_outputs": {"choice": ["\u202e", "a b"]}},
    {"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}}}]}])
_constrained = st.tuples(_grammar, st.fixed_dictionaries({}, optional={
    "min_tokens": st.integers(0, 8), "ignore_eos": st.booleans(), "n": st.integers(1, 3),
    "stop_token_ids": st.lists(st.sampled_from([0, 1, 128000, 128001, 128008, 128009, 128256, 128257, 10**9]),
                               max_size=3),
    "stop": st.one_of(_text, st.lists(_text, max_size=2)), "stream": st.booleans(),
    "temperature": st.sampled_from([0.0, 1.0]), "seed": st.integers(0, 3), "logprobs": st.booleans(),
    "trim": st.sampled_from(["none", {"k_ratio": 0.5}, {"enabled": False}, "bogus"])}))
_tokenize_request = st.one_of(
    st.fixed_dictionaries({"prompt": _text}, optional={"add_special_tokens": st.booleans(),
                                                       "return_token_strs": st.booleans()}),
    st.fixed_dictionaries({"messages": st.lists(_message, max_size=3)}, optional={
        "add_generation_prompt": st.booleans(), "return_token_strs": st.booleans(), "model": _text}))
_detokenize_request = st.fixed_dictionaries({"tokens": st.one_of(st.lists(_ints, max_size=5), _text)},
                                            optional={"model": st.one_of(st.none(), _text)})
FUZZ_EXAMPLES = int(os.environ.get("CROSSTRIM_FUZZ_EXAMPLES", "60"))


def test_fuzz_never_5xx(app):  # noqa: F811 - the imported fixture
    """Every endpoint (chat, completions, tokenize, detokenize, models; the trim extension among the fields) under
    hypothesis: strings from all of Unicode (surrogates and control characters too, sent as JSON escapes), tool-call
    messages, grammars with the sampling fields that fight them. Never a 5xx, every error in OpenAI's shape, and a
    good greedy stream running beside the fuzz (another key) gets the same tokens as alone."""
    statuses, good = [], {"prompt": "count", "max_tokens": 24, "ignore_eos": True, "stream": True, "temperature": 0}
    other_key = {"Authorization": f"Bearer {KEYS[1]}"}

    def good_text(http) -> str:
        text, reasons = "", []
        with http.stream("POST", "/v1/completions", json=good, headers=other_key) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:]).get("choices", []):
                        text += c["text"]
                        reasons += [c["finish_reason"]] if c["finish_reason"] else []
        assert reasons == ["length"], reasons
        return text

    def check(r: httpx.Response, what):
        statuses.append(r.status_code)
        assert r.status_code < 500, (what, r.text)
        if r.status_code != 200:
            assert_openai_error(r, r.status_code)
        elif what[0] != "/detokenize" and "text/event-stream" in r.headers.get("content-type", ""):
            assert '"error"' not in r.text, (what, r.text)

    with httpx.Client(base_url=app.url, timeout=TIMEOUT, headers={"Authorization": f"Bearer {KEYS[2]}"}) as http:
        alone = good_text(http)
        beside, stop = [], threading.Event()

        def keep_going():  # the good request, again and again while the fuzz runs
            with httpx.Client(base_url=app.url, timeout=TIMEOUT) as mine:
                while not stop.is_set():
                    beside.append(good_text(mine))

        runner = threading.Thread(target=keep_going, daemon=True)
        runner.start()
        fuzz = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))

        @settings(fuzz, max_examples=FUZZ_EXAMPLES)
        @given(_request)
        def probe(req):
            if isinstance(req.get("max_tokens"), int) and req["max_tokens"] > 8:
                req["max_tokens"] = 8  # keep the run short; huge values are still tried below 2^70 by the floats
            check(raw_post(http, "/v1/chat/completions", req), ("/v1/chat/completions", req))

        @settings(fuzz, max_examples=FUZZ_EXAMPLES // 2)
        @given(_constrained, st.sampled_from(["/v1/chat/completions", "/v1/completions"]), _text)
        def probe_constrained(constraint, path, text):
            grammar, fields = constraint
            if path == "/v1/chat/completions":
                req = {**chat(text, max_tokens=8), **grammar, **fields}
            else:
                grammar = {k: v for k, v in grammar.items() if k not in ("response_format", "tools", "tool_choice")}
                req = {"prompt": text or "x", "max_tokens": 8, **grammar, **fields}
            check(raw_post(http, path, req), (path, req))

        @settings(fuzz, max_examples=FUZZ_EXAMPLES // 2)
        @given(st.one_of(st.tuples(st.just("/v1/completions"), _text_request),
                         st.tuples(st.just("/tokenize"), _tokenize_request),
                         st.tuples(st.just("/detokenize"), _detokenize_request),
                         st.tuples(st.just("/v1/models/"), _text)))
        def probe_other(case):
            path, req = case
            if path == "/v1/models/":
                from urllib.parse import quote

                r = http.get(path + quote(req.encode("utf-8", "surrogatepass"), safe=""))
            else:
                r = raw_post(http, path, req)
            check(r, (path, req))

        try:
            probe()
            probe_constrained()
            probe_other()
            check(http.get("/v1/models"), ("/v1/models", None))
        finally:
            stop.set()
            runner.join(300)
    print(f"fuzz: {len(statuses)} requests, statuses {sorted(set(statuses))}; the good stream ran {len(beside)} "
          "times beside it")
    assert beside and all(text == alone for text in beside), (alone, beside)
    assert_healthy(app.http)



"""What vLLM's OpenAI server accepts, through the real `openai` SDK against the Serve app: sampling fields reach
the sampler (checked against the in-process engine and against what each field means), structured output with
images, tools, /v1/completions, /v1/models/{id}, /tokenize, /detokenize, /metrics, usage details."""

import asyncio
import json
import uuid

import httpx
import jsonschema
import openai
import pytest
import yaml

from tests.helpers import ROOT, data_url, image, png

MODEL = "crosstrim-tiny"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["shape", "row", "seen"],
          "properties": {"shape": {"enum": ["square", "circle", "triangle"]},
                         "row": {"type": "integer", "minimum": 1, "maximum": 4}, "seen": {"type": "boolean"}}}



@pytest.fixture()
def client(serve_app):
    return openai.OpenAI(base_url=serve_app.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture()
def http(serve_app):
    with httpx.Client(base_url=serve_app.url, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def engine():
    """The in-process engine on the YAML's model: the reference for what the Serve app must produce."""
    from pipeline.config import ModelConfig
    from pipeline.engine.llm_engine import LLMEngine
    from pipeline.model.loader import load_model

    args = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())["applications"][0]["args"]
    return LLMEngine(load_model(ModelConfig(**args["model"]), parts=("text",)))


def user(text: str, *pngs: bytes) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pngs]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def reference(http, engine, messages, **fields) -> list[int]:
    """The in-process engine's tokens for a text-only chat (its ids from the app's own /tokenize)."""
    from pipeline.engine.sampling import SamplingParams
    from pipeline.types import DecodeRequest

    ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    (seq,) = engine.generate([DecodeRequest(ids)], SamplingParams(**fields))
    return seq.output_ids


def token_ids(client, messages, extra_body: dict | None = None, **fields) -> tuple[list[int], str]:
    r = client.chat.completions.create(model=MODEL, messages=messages, **fields,
                                       extra_body={"return_token_ids": True, **(extra_body or {})})
    return r.model_extra["token_ids"], r.choices[0].finish_reason


# ---------------------------------------------------------------- sampling fields

def test_sampling_fields_reach_the_sampler(client, http, engine):
    msgs = user("what is the shape at row one column three?")
    def ids(text: str) -> list[int]:
        return http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]

    a_token, (eot,) = ids(" circle")[0], ids("<|eot_id|>")

    forced, _ = token_ids(client, msgs, max_tokens=5, temperature=1.0, logit_bias={str(a_token): 100})
    assert forced == [a_token] * 5  # +100 makes it the only token with any probability
    none, reason = token_ids(client, msgs, max_tokens=8, logit_bias={str(eot): 100})
    assert none == [] and reason == "stop"  # the end-of-turn token at once
    three, reason = token_ids(client, msgs, max_tokens=8, logit_bias={str(eot): 100}, extra_body={"min_tokens": 3})
    assert len(three) == 3 and reason == "stop"  # no end of sequence before min_tokens
    stopped, reason = token_ids(client, msgs, max_tokens=5, temperature=1.0, logit_bias={str(a_token): 100},
                                extra_body={"stop_token_ids": [a_token]})
    assert stopped == [] and reason == "stop"

    sampled = dict(max_tokens=12, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    first, _ = token_ids(client, msgs, **sampled)
    assert token_ids(client, msgs, **sampled)[0] == first  # seeded: reproducible
    assert token_ids(client, msgs, **{**sampled, "seed": 8})[0] != first
    greedy, _ = token_ids(client, msgs, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert token_ids(client, msgs, **{**sampled, "extra_body": {"ignore_eos": True, "top_k": 1}})[0] == greedy
    assert token_ids(client, msgs, **{**sampled, "extra_body": {"ignore_eos": True, "min_p": 1.0}})[0] == greedy

    penalised = dict(max_tokens=16, presence_penalty=1.5, frequency_penalty=0.5, ignore_eos=True)
    got, _ = token_ids(client, msgs, max_tokens=16, presence_penalty=1.5, frequency_penalty=0.5,
                       extra_body={"ignore_eos": True})
    assert got == reference(http, engine, msgs, **penalised)
    got, _ = token_ids(client, msgs, max_tokens=16, extra_body={"ignore_eos": True, "repetition_penalty": 1.8})
    assert got == reference(http, engine, msgs, max_tokens=16, repetition_penalty=1.8, ignore_eos=True)


def test_defaults_clients_send_are_accepted(client, http):
    """What the SDK, LangChain and the benchmark tools send even when unused: penalties at 0, store, metadata,
    parallel_tool_calls, the developer role (rendered as system), an image part's uuid, stop: null."""
    r = client.chat.completions.create(
        model=MODEL, max_tokens=3, presence_penalty=0, frequency_penalty=0, store=False, metadata={"a": "b"},
        user="u", service_tier="auto", messages=[{"role": "developer", "content": "terse"},
                                                 {"role": "user", "content": "hi"}],
        extra_body={"stop": None, "stream_options": None})
    assert r.choices[0].finish_reason in ("stop", "length")
    as_dev = http.post("/tokenize", json={"messages": [{"role": "developer", "content": "x"}]}).json()["tokens"]
    as_sys = http.post("/tokenize", json={"messages": [{"role": "system", "content": "x"}]}).json()["tokens"]
    assert as_dev == as_sys
    part = {"type": "image_url", "image_url": {"url": data_url(png(image(64, 64, 31)))}, "uuid": "aiperf-0"}
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens_details"]["image_tokens"] == r.json()["trim"]["visual_tokens"] > 0
    with pytest.raises(openai.BadRequestError, match="audio is not supported"):
        client.chat.completions.create(model=MODEL, messages=user("hi"), audio={"voice": "alloy", "format": "wav"},
                                       modalities=["text", "audio"])


# ---------------------------------------------------------------- structured output

def test_json_schema_with_images_always_validates(serve_app):
    """Seeded requests at temperature 1 with images, sent at once (they share decode steps): every completion
    parses and validates."""
    pictures = [png(image(64 + 36 * (i % 3), 64, 40 + i)) for i in range(4)]
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "strict": True, "schema": SCHEMA}}

    async def run():
        aclient = openai.AsyncOpenAI(base_url=serve_app.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        return await asyncio.gather(*(aclient.chat.completions.create(
            model=MODEL, messages=user("describe the shape", pictures[i % 4]), temperature=1.0, seed=i,
            max_tokens=48, response_format=fmt) for i in range(16)))

    responses = asyncio.run(run())
    texts = [r.choices[0].message.content for r in responses]
    for r, text in zip(responses, texts):
        assert r.choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 2


def test_vllm_extras_and_bad_specs(client):
    msgs = user("which side?")
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=1.0, seed=1, max_tokens=8,
                                       extra_body={"guided_choice": ["left", "right"]})
    assert r.choices[0].message.content in ("left", "right")
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=1.0, seed=2, max_tokens=12,
                                       extra_body={"structured_outputs": {"regex": "[A-C][0-9]{3}"}})
    assert len(r.choices[0].message.content) == 4 and r.choices[0].message.content[0] in "ABC"
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=1.0, seed=3, max_tokens=24,
                                       extra_body={"guided_json": {"type": "object", "properties": {
                                           "ok": {"type": "boolean"}}, "required": ["ok"]}})
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)
    long_note = {"type": "json_schema", "json_schema": {"name": "note", "schema": {
        "type": "object", "properties": {"note": {"type": "string", "minLength": 40}}, "required": ["note"]}}}
    cut = client.chat.completions.create(model=MODEL, messages=msgs, temperature=1.0, seed=4, max_tokens=6,
                                         response_format=long_note)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content.startswith("{")
    with pytest.raises(openai.BadRequestError, match="invalid json schema"):
        client.chat.completions.create(model=MODEL, messages=msgs, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 3}}})
    with pytest.raises(openai.BadRequestError, match="one output constraint"):
        client.chat.completions.create(model=MODEL, messages=msgs, response_format={"type": "json_object"},
                                       extra_body={"guided_regex": "a"})


# ---------------------------------------------------------------- endpoints

def test_text_completions(client, http):
    r = client.completions.create(model=MODEL, prompt="what is the shape", max_tokens=6, logprobs=2,
                                  extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.finish_reason == "length" and r.usage.completion_tokens == 6
    assert len(choice.logprobs.tokens) == 6 and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    # ignore_eos: end-of-turn tokens may be among them, in the logprobs but (special) not in the text
    assert "".join(t for t in choice.logprobs.tokens if not t.startswith("<|")) == choice.text
    ids = http.post("/tokenize", json={"prompt": "what is the shape"}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == choice.text and by_ids.usage.prompt_tokens == r.usage.prompt_tokens
    chunks = list(client.completions.create(model=MODEL, prompt="what is the shape", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 6
    bad = http.post("/v1/completions", json={"prompt": [999999], "max_tokens": 2})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]


def test_models_tokenize_detokenize_and_continuous_usage(client, http):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    tok = http.post("/tokenize", json={"prompt": "hello there", "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 2048 and tok["token_strs"][0]
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"].endswith("hello there")
    stream = client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=4, stream=True,
                                            extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True, "continuous_usage_stats": True})
    usages = [c.usage.completion_tokens for c in stream if c.usage is not None]
    assert usages[-1] == 4 and usages == sorted(usages) and len(usages) >= 4


def test_metrics_on_the_api_port_match_rays_metrics_port(serve_app, http):
    def names(text: str) -> set[str]:
        return {line.split(" ")[2] for line in text.splitlines() if line.startswith("# TYPE ")}

    http.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2})
    theirs = httpx.get(serve_app.metrics_url, timeout=30).text
    ours = http.get("/metrics")
    assert ours.status_code == 200 and ours.headers["content-type"].startswith("text/plain")
    assert names(ours.text) >= names(theirs) and any(n.startswith("ray_serve_") for n in names(ours.text))


# ---------------------------------------------------------------- evaluation: echo, prompt_logprobs, several prompts

def _hf_logprobs(engine, ids: list[int]):
    """The oracle on the app's model: log_softmax of HF's forward at every prompt row (fp32)."""
    import torch

    from tests.helpers import meta_reference

    with torch.no_grad(), meta_reference(engine.loaded.model):
        return torch.log_softmax(engine.loaded.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echo_and_prompt_logprobs_equal_hf_forward(client, http, engine):
    """lm-evaluation-harness's request (several prompts, echo, logprobs 1, max_tokens 1) and max_tokens 0: every
    prompt token's logprob equals HF's forward within 1e-4; choices prompt-major; vLLM's prompt_logprobs on
    completions and chat."""
    texts = ["where is the red square?", "what colour is the shape at row one column two?"]
    ids = [http.post("/tokenize", json={"prompt": t}).json()["tokens"] for t in texts]
    ref = [_hf_logprobs(engine, i) for i in ids]
    r = http.post("/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1,
                                           "temperature": 0, "n": 2}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["usage"]["prompt_tokens"] == sum(map(len, ids))
    for i, c in enumerate(r["choices"]):
        p, lp = ids[i // 2], c["logprobs"]
        assert len(lp["tokens"]) == len(p) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [float(ref[i // 2][j, p[j + 1]]) for j in range(len(p) - 1)]
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1 : len(p)], want)) < 1e-4
        greedy = int(ref[i // 2][-1].argmax())  # the one generated (or stop) token: the greedy one
        assert abs(lp["token_logprobs"][-1] - float(ref[i // 2][-1, greedy])) < 1e-4
    scored = client.completions.create(model=MODEL, prompt=texts[0], echo=True, max_tokens=0, logprobs=0,
                                       extra_body={"prompt_logprobs": 2})
    (c,) = scored.choices
    assert c.text == texts[0] and c.finish_reason == "length" and scored.usage.completion_tokens == 0
    pl = c.model_extra["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(ids[0])
    for j, entry in enumerate(pl[1:]):
        tok = ids[0][j + 1]
        assert abs(entry[str(tok)]["logprob"] - float(ref[0][j, tok])) < 1e-4
        assert sum(1 for v in entry.values() if v["rank"] <= 2) >= 2  # the top 2, ranks 1 and 2
    msgs = [{"role": "user", "content": texts[1]}]
    chat_ids = http.post("/tokenize", json={"messages": msgs}).json()["tokens"]
    chat_ref = _hf_logprobs(engine, chat_ids)
    chat = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 0, "prompt_logprobs": 0}).json()
    assert chat["choices"][0]["message"]["content"] == "" and len(chat["prompt_logprobs"]) == len(chat_ids)
    got = [e[str(chat_ids[j + 1])]["logprob"] for j, e in enumerate(chat["prompt_logprobs"][1:])]
    assert max(abs(a - float(chat_ref[j, chat_ids[j + 1]])) for j, a in enumerate(got)) < 1e-4
    bad = http.post("/v1/completions", json={"prompt": [ids[0], [999999]], "max_tokens": 2})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
    streamed = http.post("/v1/chat/completions", json={"messages": msgs, "prompt_logprobs": 1, "stream": True})
    assert streamed.status_code == 400 and "prompt_logprobs" in streamed.json()["error"]["message"]


def test_echo_streams_and_image_prompt_logprobs(client, images):
    """Several prompts streamed (choices interleaved, each echoed first); an image chat's prompt_logprobs follow
    the trimmed model (one entry per prompt token, the image token's null: the lm_head cannot produce it)."""
    texts = ["where is the red square?", "how many circles are there?"]
    whole = client.completions.create(model=MODEL, prompt=texts, echo=True, max_tokens=4,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=MODEL, prompt=texts, echo=True, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    by_index = {}
    for ch in chunks:
        for c in ch.choices:
            by_index[c.index] = by_index.get(c.index, "") + c.text
    assert by_index == {c.index: c.text for c in whole.choices}
    assert [whole.choices[i].text.startswith(t) for i, t in enumerate(texts)] == [True, True]
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    r = client.chat.completions.create(model=MODEL, messages=user("where is the red square?", images["openai"]),
                                       max_tokens=1, extra_body={"prompt_logprobs": 0, "return_token_ids": True})
    pl = r.model_extra["prompt_logprobs"]
    assert len(pl) == r.usage.prompt_tokens and pl[0] is None
    assert sum(e is None for e in pl) == 2  # the first token and the image token
    assert r.model_extra["trim"]["kept_tokens"] < r.model_extra["trim"]["visual_tokens"]


def test_prefix_cache_through_the_api_cached_tokens_salt_and_reset(client, http):
    """docs/prefix_caching.md through the openai SDK: a repeated system prompt's full pages are reused (OpenAI's
    usage.prompt_tokens_details.cached_tokens, the same greedy answer), vLLM's cache_salt keeps requests of different
    salts apart, /stats counts the pages, and POST /reset_prefix_cache empties the cache."""
    system = f"session {uuid.uuid4().hex}: answer in one word. " * 8  # its own prompt: nothing cached yet

    def ask(salt: str | None = None):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": "say hi"}],
            max_tokens=3, temperature=0, extra_body={"cache_salt": salt} if salt else None)
        details = r.usage.prompt_tokens_details
        return r.choices[0].message.content, r.usage.prompt_tokens, details.cached_tokens if details else 0

    text, prompt_tokens, cached = ask()
    assert cached == 0 and prompt_tokens > 100
    again = ask()
    assert again[0] == text and 0 < again[2] < prompt_tokens, again  # full pages, never the last row
    pages = http.get("/stats").json()["decoder"]["prefix_cached_pages"]
    assert pages >= 1, pages
    assert ask("tenant-a")[2] == 0  # another salt shares nothing ...
    assert ask("tenant-a")[2] == again[2]  # ... with its own requests it does

    # An image prompt behind the system prompt: the trimmer takes the system prompt's rows from its own cache and
    # ships only the rest; the decoder, which holds them, gives the same answer.
    def look(pixels: bytes, salt: str | None = None):
        before = trimmer_hits()
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": system}, *user("which colour?", pixels)],
            max_tokens=3, temperature=0, extra_body={"cache_salt": salt} if salt else None)
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens, trimmer_hits() - before

    def trimmer_hits() -> int:
        return sum(c["hit_rows"] for c in http.get("/stats").json()["trimmer_prefix_cache"])

    pixels = png(image(64, 64, 7))
    first = look(pixels)
    seen = look(pixels)
    assert seen[0] == first[0] and seen[1] > 0 and seen[2] > 0, (first, seen)
    assert look(pixels, "tenant-b")[1:] == (0, 0)  # another salt: neither stage shares
    reset = http.post("/reset_prefix_cache")
    assert reset.status_code == 200 and reset.json()["replicas"] >= 1, reset.text
    assert reset.json()["trimmer_replicas"] >= 1 and reset.json()["trimmer_pages"] >= 1, reset.text
    assert ask() == (text, prompt_tokens, 0)
    assert look(pixels)[::2] == (first[0], 0)  # the trimmer's cache was emptied (the decoder's holds ask()'s again)

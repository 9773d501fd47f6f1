"""The ingress's validation layer without a cluster: the field each refusal names, the image URL allowlist after
normalisation (a real HTTP server on loopback, redirects), the per-key guard on every endpoint that does work, and
/tokenize's and /detokenize's tokenizer apart from the one image preprocessing locks."""

import asyncio
import http.server as http_server
import threading
from types import SimpleNamespace

import httpx
import pytest

from deployments import api, validation
from deployments.auth import KeyLedger
from deployments.images import ImageFetcher
from deployments.limits import Guard, GuardMiddleware
from deployments.urls import allowed_http, allowed_url
from pipeline.errors import InvalidRequest
from tests.helpers import image, png

BAD = "a\ud800b"  # what the JSON escape "\ud800" parses to: not Unicode, cannot be tokenised or sent on


def refusal(check, *args, **kwargs) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        check(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("model, body, field", [
    (api.CompletionRequest, {"prompt": BAD}, "prompt"),
    (api.CompletionRequest, {"prompt": "x", "stop": ["ok", BAD]}, "stop[1]"),
    (api.TokenizeRequest, {"prompt": BAD}, "prompt"),
    (api.TokenizeRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": BAD}]}]},
     "messages[0].content[0].text"),
    (api.ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "guided_json": {BAD: 1}},
     "guided_json"),
    (api.ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}],
                                 "structured_outputs": {"json": {"type": "string", "pattern": BAD}}},
     "structured_outputs.json.pattern"),
    (api.ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "user": BAD}, "user"),
    (api.ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "description": BAD}}]}, "tools[0].function.description"),
    (api.ChatCompletionRequest, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:" + BAD}}]}]}, "messages[0].content[0].image_url.url"),
])
def test_text_that_is_not_unicode_is_refused_naming_its_field(model, body, field):
    error = refusal(validation.check_request, model.model_validate(body))
    assert error.param == field and field in str(error), (error.param, str(error))


def test_text_with_control_characters_passes_and_deep_nesting_does_not_recurse():
    odd = "\x00\x1b[2J\u202e\ufeff\uffff\U0010ffff"
    validation.check_request(api.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": odd}], "stop": odd, "metadata": {odd: odd}}))
    deep: dict = {"x": BAD}
    for _ in range(5000):  # far past Python's recursion limit: the walk is iterative
        deep = {"a": deep}
    error = refusal(validation.check_text, {"metadata": deep})
    assert error.param.startswith("metadata.a.a") and error.param.endswith(".x")


def test_tool_call_arguments_must_be_a_json_object():
    def chat(arguments):
        return api.ChatCompletionRequest.model_validate({"messages": [
            {"role": "user", "content": "call f"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}},
                                                 {"type": "function", "function": {"name": "g",
                                                                                   "arguments": arguments}}]}]})

    for arguments in ("{not json", "[1, 2]", '"s"', "", "NaN"):
        error = refusal(validation.check_request, chat(arguments))
        assert error.param == "messages[1].tool_calls[1].function.arguments", error
    validation.check_request(chat('{"a": [1, {"b": null}]}'))


def test_token_ids_and_sampling_fields_in_the_vocabulary():
    vocab = validation.Vocab(100, frozenset({99}))
    validation.check_token_ids([0, 99], vocab, "prompt")
    assert refusal(validation.check_token_ids, [0, 100], vocab, "prompt").param == "prompt"
    assert refusal(validation.check_token_ids, [1] * 11, vocab, "tokens", 10).param == "tokens"
    for body, field in (({"logit_bias": {"99": 1}}, "logit_bias"), ({"stop_token_ids": [5, 100]}, "stop_token_ids"),
                        ({"stop_token_ids": [99]}, "stop_token_ids")):
        req = api.CompletionRequest.model_validate({"prompt": "x", **body})
        assert refusal(validation.check_sampling, req, vocab).param == field
    validation.check_sampling(api.CompletionRequest.model_validate(
        {"prompt": "x", "logit_bias": {"98": -100}, "stop_token_ids": [0, 98]}), vocab)


def test_constraint_errors_name_their_field():
    def params(**fields):
        req = api.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})
        return asyncio.run(validation.sampling_params(req, validation.Vocab(1000), 16))

    assert refusal(params, guided_regex="a(").param == "guided_regex"
    assert refusal(params, structured_outputs={"json": "{nope"}).param == "structured_outputs.json"
    assert refusal(params, guided_regex="a", guided_choice=["b"]).param in ("guided_regex", "guided_choice")
    assert refusal(params, temperature=1e-9).param == "temperature"
    assert params(guided_json={"type": "boolean"}, ignore_eos=True, min_tokens=5).structured.kind == "json_schema"


# ---------------------------------------------------------------- image URLs

PREFIX = ["http://img.example:8080/allowed/"]


@pytest.mark.parametrize("url", [
    "http://img.example:8080/allowed/../other/x.png", "http://img.example:8080/allowed/%2e%2e/other/x.png",
    "http://img.example:8080/allowed/%2E%2e/other/x.png", "http://img.example:8080/allowed/.%2E/other/x.png",
    "http://img.example:8080/allowed/..%2fother/x.png", "http://img.example:8080/allowed/..%5Cother/x.png",
    "http://img.example:8080/allowed\\..\\other/x.png", "http://img.example:8080/allowedX/x.png",
    "http://user@img.example:8080/allowed/x.png", "http://img.example:8081/allowed/x.png",
    "https://img.example:8080/allowed/x.png", "http://img.example:8080/allowed/a/../../other/x.png",
    "http://img.example:8080/allowed/x.png\n", "http://img.example:99999/allowed/x.png",
])
def test_allowlist_refuses_urls_that_leave_it(url):
    assert not allowed_http(url, PREFIX), url


@pytest.mark.parametrize("url, fetched", [
    ("http://img.example:8080/allowed/x.png", "http://img.example:8080/allowed/x.png"),
    ("HTTP://IMG.Example:8080/allowed/./a/../x.png#frag", "http://img.example:8080/allowed/x.png"),
    ("http://img.example:8080/allowed/%78.png?sig=%2F1", "http://img.example:8080/allowed/x.png?sig=%2F1"),
])
def test_allowlist_compares_and_fetches_the_normalised_url(url, fetched):
    assert allowed_url(url, PREFIX) == fetched
    assert allowed_url("https://Img.Example:443/a/b.png", ["https://img.example/a/"]) == "https://img.example/a/b.png"
    assert allowed_url("http://img.example/a", ["http://img.example:80/a"]) == "http://img.example/a"


@pytest.fixture(scope="module")
def image_host():
    """A real HTTP server: /allowed/img.png and /other/img.png are images, /allowed/hop redirects inside the
    allowlist, /allowed/out redirects out of it, /allowed/loop redirects to itself. Records the paths asked."""
    body, seen = png(image(16, 16, 3)), []

    class Handler(http_server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            hops = {"/allowed/hop": "/allowed/sub/../img.png", "/allowed/out": "/other/img.png",
                    "/allowed/loop": "/allowed/loop", "/allowed/abs": f"{base}/allowed/img.png"}
            found = self.path.endswith("/img.png")
            status, headers = (302, {"Location": hops[self.path]}) if self.path in hops else (404 - 204 * found, {})
            payload = body if status == 200 else b""
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(payload))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=base, body=body, seen=seen)
    server.shutdown()


def fetcher(image_host) -> ImageFetcher:
    return ImageFetcher(SimpleNamespace(http_allowlist=[f"{image_host.url}/allowed/"], s3_buckets=["images"],
                                        image_fetch_timeout_s=10.0, max_image_bytes=2**20))


def test_fetch_follows_redirects_inside_the_allowlist_only(image_host):
    async def run():
        f = fetcher(image_host)
        assert await f.fetch(f"{image_host.url}/allowed/img.png", "image 1") == image_host.body
        assert await f.fetch(f"{image_host.url}/allowed/hop", "image 1") == image_host.body
        assert await f.fetch(f"{image_host.url}/allowed/abs", "image 1") == image_host.body
        for path, why in (("/allowed/../other/img.png", "allowlist"), ("/allowed/%2e%2e/other/img.png", "allowlist"),
                          ("/allowed/out", "allowlist"), ("/allowed/loop", "redirects")):
            with pytest.raises(InvalidRequest, match=why):
                await f.fetch(image_host.url + path, "image 1")

    asyncio.run(run())
    assert "/other/img.png" not in image_host.seen and "/allowed/img.png" in image_host.seen


@pytest.mark.parametrize("url", ["s3://images/../secret.png", "s3://images/a/%2e%2e/b.png", "s3://images/./a.png",
                                 "s3://images/", "s3://other/a.png"])
def test_s3_keys_with_dot_segments_and_other_buckets_are_refused(url, image_host):
    with pytest.raises(InvalidRequest, match=r"'\.\.'|names no key|bucket"):
        asyncio.run(fetcher(image_host).fetch(url, "image 1"))


# ---------------------------------------------------------------- per-key guard, tokenizer apart from images

@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize", "/detokenize", "/v1/chat/completions"])
def test_per_key_concurrency_counts_every_endpoint_that_does_work(path):
    """One key at its limit of concurrent requests (a chat request held open): a request on `path` is refused with
    429 before its body is read; another client is served; /v1/models (no work) is not counted."""
    async def run():
        entered, release = asyncio.Event(), asyncio.Event()

        async def app(scope, receive, send):
            if scope["path"] == "/v1/chat/completions" and not entered.is_set():
                entered.set()
                await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        guard = Guard(ledger=KeyLedger(max_concurrent=1))
        guarded = GuardMiddleware(app, lambda: guard)
        one = httpx.AsyncClient(transport=httpx.ASGITransport(guarded, client=("10.0.0.1", 1)), base_url="http://t")
        two = httpx.AsyncClient(transport=httpx.ASGITransport(guarded, client=("10.0.0.2", 1)), base_url="http://t")
        held = asyncio.create_task(one.post("/v1/chat/completions", json={}))
        await entered.wait()
        over, other, models = (await one.post(path, json={}), await two.post(path, json={}),
                               await one.get("/v1/models"))
        release.set()
        assert (await held).status_code == 200
        return over, other, models, await one.post(path, json={})

    over, other, models, after = asyncio.run(run())
    assert over.status_code == 429 and over.json()["error"]["type"] == "rate_limit_error"
    assert other.status_code == models.status_code == after.status_code == 200


@pytest.fixture(scope="module")
def pre():
    """The ingress's preprocessor of the bundled model (its processor alone)."""
    from deployments.config import AppConfig
    from deployments.preprocess import Preprocessor

    return Preprocessor(AppConfig())


def test_tokenize_and_detokenize_do_not_wait_on_image_preprocessing(pre):
    """The text endpoints tokenise on a tokenizer of their own: with the image lock held, they still answer."""
    ids = pre.tokenize("where is the red circle?", True)
    message = api.TokenizeRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]}).messages
    with pre.lock:  # image preprocessing in progress
        async def run():
            return await asyncio.wait_for(asyncio.gather(
                asyncio.to_thread(pre.detokenize, ids), asyncio.to_thread(pre.tokenize, "hi", False),
                asyncio.to_thread(pre.render, message, True)), 60)

        text, hi, rendered = asyncio.run(run())
    assert text.endswith("where is the red circle?") and hi and len(rendered) > len(hi)
    assert pre.text_tokenizer is not pre.tokenizer and pre.vocab.size == len(pre.tokenizer)


def test_fuzz_validation_and_text_preprocessing_raise_only_invalid_request(pre):
    """In process, the serve fuzz's bodies (tests/serve/test_fuzz.py: all of Unicode, tool calls, grammars with
    the fields that fight them) through what the ingress runs before any stage: schema, validation layer, text
    tokenising and the chat template. A body is refused (ValidationError: FastAPI's 400; InvalidRequest: ours) or
    prepared; any other exception would be a 500."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from pydantic import ValidationError

    from tests.serve import test_fuzz as serve_fuzz

    outcomes = {"schema": 0, "invalid": 0, "prepared": 0}

    def through(model, body, prepare):
        try:
            req = model.model_validate(body)
        except ValidationError:
            outcomes["schema"] += 1
            return
        try:
            asyncio.run(prepare(req))
            outcomes["prepared"] += 1
        except InvalidRequest as exc:
            assert exc.param is None or isinstance(exc.param, str)
            outcomes["invalid"] += 1

    async def chat(req):
        await validation.sampling_params(req, pre.vocab, 8)
        pre.check_messages(req.messages)
        pre.render(req.messages, True)

    async def text(req):
        await validation.sampling_params(req, pre.vocab, 8)
        for prompt in req.prompts:  # as the ingress: one engine request a prompt
            await pre.prepare_text(prompt)

    async def tokenize(req):
        validation.check_request(req)
        pre.tokenize(req.prompt, True) if req.prompt is not None else pre.render(req.messages, True)

    constrained = st.tuples(serve_fuzz._constrained, serve_fuzz._text).map(
        lambda c: {"messages": [{"role": "user", "content": c[1]}], "max_tokens": 8, **c[0][0], **c[0][1]})

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.tuples(st.just("chat"), serve_fuzz._request), st.tuples(st.just("chat"), constrained),
                     st.tuples(st.just("text"), serve_fuzz._text_request),
                     st.tuples(st.just("tokenize"), serve_fuzz._tokenize_request)))
    def probe(case):
        kind, body = case
        model, prepare = {"chat": (api.ChatCompletionRequest, chat), "text": (api.CompletionRequest, text),
                          "tokenize": (api.TokenizeRequest, tokenize)}[kind]
        through(model, body, prepare)

    probe()
    print(f"validation fuzz: {outcomes}")
    assert outcomes["invalid"] and outcomes["prepared"]

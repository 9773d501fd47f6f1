"""A public endpoint under hostile clients and dying replicas: one real local Ray + Serve app (configs/local.yaml
with API keys and per-key limits on), spoken to over HTTP and raw sockets on 127.0.0.1."""

import asyncio
import json
import os
import select
import signal
import socket
import time
from types import SimpleNamespace

import httpx
import psutil
import pytest

from tests import helpers
from tests.serve.conftest import APP

KEYS = ("k-alpha-123", "k-beta-456", "k-fuzz-789")
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
# Waits are bounded by these, not by the machine's speed: the body-read timeout is well above what a small request
# takes on a busy 2-core machine (tests check that others are answered while idle bodies still wait for it), and
# requests wait for a restarting decoder replica for as long as a loaded machine needs to start one.
BODY_TIMEOUT_S = 30
STAGE_WAIT_S = 600
PER_KEY_CONCURRENT = 3
PER_KEY_KV = 4 * 2**20  # of the decoder's 16 MiB


def chat(text: str = "hi", **fields) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4, **fields}


def assert_openai_error(r: httpx.Response, status: int):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    assert "Traceback" not in r.text and "ray." not in r.text.lower() and "\x1b[" not in r.text


def replica_pid(name: str) -> int:
    """The pid of this test's replica of deployment `name`: a descendant of this driver (other Serve apps on the
    machine have replicas of the same name)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if f"ServeReplica:{APP}:{name}" in " ".join(p.cmdline()):
                found.append(p.pid)
        except psutil.Error:
            continue
    assert len(found) == 1, f"{len(found)} live {name} replicas"
    return found[0]


pytestmark = pytest.mark.serve_config(env={"CROSSTRIM_API_KEYS": ",".join(KEYS)}, args={
    "body_read_timeout_s": BODY_TIMEOUT_S, "stage_wait_s": STAGE_WAIT_S, "per_key_max_concurrent": PER_KEY_CONCURRENT,
    "per_key_max_kv_bytes": PER_KEY_KV})
TIMEOUT = httpx.Timeout(60, read=300)  # a client's: per read, so a stream still producing is never cut


@pytest.fixture()
def app(serve_app):
    """The shared app with API keys and per-key limits (this module's serve_config), an authorised client on it."""
    with httpx.Client(base_url=serve_app.url, timeout=TIMEOUT, headers=AUTH) as http:
        yield SimpleNamespace(url=serve_app.url, port=serve_app.port, http=http, config=serve_app.config)


def assert_healthy(http):
    helpers.assert_healthy(http, chat("still there?", max_tokens=2), kv_wait_s=120)


# ---------------------------------------------------------------- auth, error shape, OpenAPI

def test_auth(app):
    with httpx.Client(base_url=app.url, timeout=TIMEOUT) as anon:
        assert anon.get("/health").status_code == 200  # stays open for probes
        r = anon.post("/v1/chat/completions", json=chat())
        assert_openai_error(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
        assert_openai_error(anon.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer nope"}),
                            401)
        assert_openai_error(anon.get("/v1/models", headers={"Authorization": f"Basic {KEYS[0]}"}), 401)
        for key in KEYS[:2]:
            r = anon.post("/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text


def test_error_shape_and_no_host_reflection(app):
    http = app.http
    bad_bodies = [b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',  # invalid UTF-8
                  b"[" * 100_000 + b"]" * 100_000,  # deeply nested
                  b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',  # lone surrogate
                  b'{"messages": [', b"", b"null",
                  b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN, "top_p": Infinity}']
    for body in bad_bodies:
        r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert_openai_error(r, 400)
    assert_openai_error(http.get("/nowhere"), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)
    r = http.post("/v1/chat/completions/", json=chat(), headers={"Host": "evil.example.com"})
    assert "evil" not in r.headers.get("location", "") and r.status_code < 500
    assert_openai_error(r, 404)
    assert_openai_error(http.post("/v1/chat/completions", json=chat(model="gpt-4")), 404)


def test_openapi_lists_the_real_statuses(app):
    doc = app.http.get("/openapi.json").json()
    chat_op = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "408", "413", "429", "503"} <= set(chat_op) and "422" not in chat_op
    assert "411" not in chat_op  # chunked bodies are accepted: nothing asks for a Content-Length
    assert "ErrorResponse" in json.dumps(chat_op["400"])
    assert "503" in doc["paths"]["/health"]["get"]["responses"]


# ---------------------------------------------------------------- isolation in the engine

BAD_SAMPLING = [dict(seed=2**64), dict(seed=-(2**63) - 1), dict(temperature=1e-300), dict(temperature=1e-40),
                dict(top_p=5e-324), dict(temperature=1.0, seed=18446744073709551616)]


def test_streams_survive_bad_requests_among_them(app):
    async def run():
        async with httpx.AsyncClient(base_url=app.url, timeout=TIMEOUT,
                                     headers={"Authorization": f"Bearer {KEYS[1]}"}) as c:
            producing = [asyncio.Event() for _ in range(PER_KEY_CONCURRENT)]

            async def stream(i):
                body = chat(f"story {i}", max_tokens=40, ignore_eos=True, stream=True, temperature=0.7, seed=i)
                reasons = []
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            producing[i].set()
                            reasons += [ch["finish_reason"] for ch in json.loads(line[6:]).get("choices", [])]
                return [x for x in reasons if x]

            streams = [asyncio.create_task(stream(i)) for i in range(PER_KEY_CONCURRENT)]
            # The bad requests go in while every stream is producing (a bound on a hang, not on speed).
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in producing)), 300)
            bad = [await c.post("/v1/chat/completions", json=chat(**p), headers={"Authorization": f"Bearer {KEYS[2]}"})
                   for p in BAD_SAMPLING]
            running = sum(not t.done() for t in streams)
            return await asyncio.gather(*streams), bad, running

    finishes, bad, running = asyncio.run(run())
    print(f"{running} of {PER_KEY_CONCURRENT} streams still running when the bad requests had been answered")
    assert finishes == [["length"]] * PER_KEY_CONCURRENT
    for r in bad:
        assert_openai_error(r, 400)
    assert_healthy(app.http)


# ---------------------------------------------------------------- limits

def test_body_and_message_limits(app):
    http, limit = app.http, app.config["applications"][0]["args"]["max_body_bytes"]
    ingress = psutil.Process(replica_pid("Ingress"))
    rss0 = ingress.memory_info().rss
    # Half a chunked body and then silence (answered at the end: body_read_timeout_s runs while the rest is tried).
    silent = socket.create_connection(("127.0.0.1", app.port), timeout=BODY_TIMEOUT_S + 300)
    silent.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Authorization: Bearer " + KEYS[0].encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"6\r\n{\"mess\r\n")
    # Four 50 MB bodies sent in full, one after another: each refused from its Content-Length, unread.
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEYS[0].encode() + b"\r\nContent-Length: 50000000\r\n\r\n")
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", app.port), timeout=30) as s:
            s.sendall(head)
            try:
                for _ in range(50):
                    s.sendall(b"a" * 1_000_000)
            except OSError:  # answered and closed while we still sent
                pass
            assert b" 413 " in s.recv(4096).split(b"\r\n")[0]
    grown = ingress.memory_info().rss - rss0
    print(f"ingress RSS growth after 4 x 50 MB bodies: {grown / 2**20:.1f} MiB (limit {limit / 2**20:.0f} MiB)")
    assert grown < 50 * 2**20
    # A chunked body (no Content-Length), as OpenAI clients may send: a small one is served; a large one is refused
    # with 413 as soon as the bytes received pass the limit, while the client is still sending.
    small = [b'{"messages": [{"role": "user", ', b'"content": "hi"}], ', b'"max_tokens": 2}']
    r = http.post("/v1/chat/completions", content=iter(small), headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    total = 200 * 1_000_000
    status, body, sent = post_chunked(app.port, (b"a" * 1_000_000 for _ in range(total // 1_000_000)))
    assert_openai_error(httpx.Response(status, content=body), 413)
    print(f"chunked {total / 1e6:.0f} MB body: 413 after {sent / 1e6:.0f} MB sent (limit {limit / 1e6:.1f} MB)")
    assert limit < sent < total
    grown = ingress.memory_info().rss - rss0
    print(f"ingress RSS growth after those and the chunked ones: {grown / 2**20:.1f} MiB")
    # At most the limit's worth was read (held twice while joined), not the 200 MB sent.
    assert grown < 2 * limit + 50 * 2**20 < total
    # 30,000 one-character messages: refused by the message count, the check made before templating or tokenising
    # (deployments/preprocess.py); the time is printed, not judged.
    t0 = time.perf_counter()
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}] * 30_000})
    assert_openai_error(r, 400)
    message = r.json()["error"]["message"]
    assert "30000 messages" in message and "at most 256" in message, message
    print(f"30,000 messages refused in {time.perf_counter() - t0:.2f} s")
    # The silent chunked body: 408 after body_read_timeout_s, as with a Content-Length.
    with silent:
        assert b" 408 " in silent.recv(4096).split(b"\r\n")[0]


def post_chunked(port: int, chunks) -> tuple[int, bytes, int]:
    """POST a chunked body over a raw socket, about 100 MB/s, until an answer arrives: (status, body, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEYS[0].encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for chunk in chunks:
                if select.select([s], [], [], 0)[0]:
                    break  # answered
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                time.sleep(0.01)
            else:
                s.sendall(b"0\r\n\r\n")
        except OSError:  # answered and closed while we still sent
            pass
        raw = b""
        while b"\r\n\r\n" not in raw and (part := s.recv(65536)):
            raw += part
        head, _, body = raw.partition(b"\r\n\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
        length = int(headers[b"content-length"])
        while len(body) < length and (part := s.recv(65536)):
            body += part
    return int(head.split(b" ")[1]), body, sent


@pytest.mark.slow  # docs/testing.md: its command
def test_idle_half_sent_connections_do_not_starve_others(app):
    """300 connections on one key announce a 100 kB body, send a part, then go silent. The per-key guard refuses all
    but PER_KEY_CONCURRENT of them at once with 429, before reading a byte of their bodies; /health and a normal
    request (another key) are answered while the admitted ones still wait for their bodies (none of those has been
    answered or closed yet, so the others did not queue behind them); each admitted one gets 408 after
    body_read_timeout_s."""
    socks = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", app.port), timeout=60)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + KEYS[2].encode() + b"\r\nContent-Length: 100000\r\n\r\n{\"mess")
            socks.append(s)
        with httpx.Client(base_url=app.url, timeout=TIMEOUT, headers={"Authorization": f"Bearer {KEYS[1]}"}) as other:
            t0 = time.perf_counter()
            assert other.get("/health").status_code == 200
            r = other.post("/v1/chat/completions", json=chat(max_tokens=2))
            assert r.status_code == 200, r.text
            print(f"/health + a request with 300 idle connections open: {time.perf_counter() - t0:.2f} s "
                  f"(body_read_timeout_s {BODY_TIMEOUT_S})")
        readable = set(select.select(socks, [], [], 0)[0])  # when the other key was served
        status = {s: status_of(s, BODY_TIMEOUT_S + 300) for s in socks}
        admitted = [s for s in socks if status[s] != 429]
        assert len(admitted) == PER_KEY_CONCURRENT, [status[s] for s in admitted]
        assert not readable.intersection(admitted), "an admitted idle connection was answered before the others"
        assert [status[s] for s in admitted] == [408] * PER_KEY_CONCURRENT
    finally:
        for s in socks:
            s.close()
    assert_healthy(app.http)


def status_of(sock: socket.socket, timeout: float) -> int:
    """The HTTP status of the first response on a raw socket."""
    sock.settimeout(timeout)
    return int(sock.recv(4096).split(b"\r\n")[0].split()[1])


def test_per_key_concurrency_and_kv_limits(app):
    async def run():
        async with httpx.AsyncClient(base_url=app.url, timeout=TIMEOUT) as c:
            key = {"Authorization": f"Bearer {KEYS[0]}"}
            body = chat("long", max_tokens=300, ignore_eos=True, stream=True)
            held = [await c.send(c.build_request("POST", "/v1/chat/completions", json=body, headers=key), stream=True)
                    for _ in range(PER_KEY_CONCURRENT)]
            over = await c.post("/v1/chat/completions", json=chat(), headers=key)
            other = await c.post("/v1/chat/completions", json=chat(),
                                 headers={"Authorization": f"Bearer {KEYS[1]}"})
            for r in held:
                await r.aclose()
            return [r.status_code for r in held], over, other

    held, over, other = asyncio.run(run())
    assert held == [200] * PER_KEY_CONCURRENT
    assert_openai_error(over, 429)
    assert over.headers["retry-after"] == "1"
    assert other.status_code == 200, other.text
    assert_healthy(app.http)


def test_per_key_kv_limit(app):
    """A key whose requests in flight reserve more than per_key_max_kv_bytes gets 429; other keys do not."""
    from ray import serve

    per_token = serve.get_deployment_handle("DecoderPool", APP).kv_bytes_per_token.remote().result(timeout_s=30)
    big = int(0.6 * PER_KEY_KV / per_token)  # one fits the key's share, two do not
    assert 16 < big < 1900, big

    async def run():
        async with httpx.AsyncClient(base_url=app.url, timeout=TIMEOUT) as c:
            a, b = ({"Authorization": f"Bearer {k}"} for k in KEYS[:2])
            body = chat("long", max_tokens=big, ignore_eos=True, stream=True)
            first = await c.send(c.build_request("POST", "/v1/chat/completions", json=body, headers=a), stream=True)
            second = await c.post("/v1/chat/completions", json=body, headers=a)
            small = await c.post("/v1/chat/completions", json=chat(max_tokens=4), headers=a)
            other = await c.send(c.build_request("POST", "/v1/chat/completions", json=body, headers=b), stream=True)
            statuses = first.status_code, other.status_code
            await first.aclose()
            await other.aclose()
            deadline = time.monotonic() + 300  # a bound on a leak, not on speed
            while True:  # the guard gives the key's KV back once the server has seen the disconnect
                r = await c.send(c.build_request("POST", "/v1/chat/completions", json=body, headers=a), stream=True)
                again = r.status_code
                await r.aclose()
                if again != 429 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            return statuses, second, small, again

    (first, other), second, small, again = asyncio.run(run())
    assert first == other == 200
    assert_openai_error(second, 429)
    assert second.headers["retry-after"] == "1" and "KV" in second.json()["error"]["message"]
    assert small.status_code == 200 and again == 200  # what the key holds is given back
    assert_healthy(app.http)


# ---------------------------------------------------------------- validation (deployments/validation.py)

def raw_post(http, path: str, body) -> httpx.Response:
    """POST `body` as ASCII JSON: a lone surrogate goes as its escape ("\\ud800"), which is valid JSON."""
    return http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def assert_400_naming(r: httpx.Response, field: str):
    assert r.status_code == 400, (field, r.status_code, r.text[:300])
    assert_openai_error(r, 400)
    error = r.json()["error"]
    assert field in error["message"] and error["param"] == field, error


CALL = {"role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}


def test_hostile_strings_and_tool_calls_are_400_naming_the_field(app):
    """Lone surrogates anywhere a request carries text, and an earlier tool call whose arguments are not a JSON
    object, are 400s naming the field on every endpoint (they were 500s: the tokenizer or the template raised)."""
    http, bad = app.http, "a\ud800b"
    cases = [
        ("/v1/completions", {"prompt": bad, "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": [bad], "max_tokens": 2}, "prompt[0]"),
        ("/v1/completions", {"prompt": "hi", "stop": [bad], "max_tokens": 2}, "stop[0]"),
        ("/tokenize", {"prompt": bad}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),  # found by the in-process fuzz: the template's IndexError
        ("/tokenize", {"messages": [{"role": "user", "content": bad}]}, "messages[0].content"),
        ("/v1/chat/completions", chat(bad), "messages[0].content"),
        ("/v1/chat/completions", chat("hi", stop=bad), "stop"),
        ("/v1/chat/completions", chat("hi", guided_choice=["yes", bad]), "guided_choice[1]"),
        ("/v1/chat/completions", chat("hi", response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {bad: {"type": "integer"}}}}}),
         "response_format.json_schema.schema.properties"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "call f"}, CALL], "max_tokens": 2},
         "messages[1].tool_calls[0].function.arguments"),
        ("/tokenize", {"messages": [{"role": "user", "content": "call f"}, CALL]},
         "messages[1].tool_calls[0].function.arguments"),
        ("/v1/chat/completions", {"max_tokens": 2, "messages": [{"role": "user", "content": "call f"}, {
            **CALL, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**9], "min_tokens": 1, "max_tokens": 2},
         "stop_token_ids"),
    ]
    for path, body, field in cases:
        assert_400_naming(raw_post(http, path, body), field)
    # Control characters, bidi overrides, noncharacters and astral code points are text: served, not refused.
    odd = "\x00\x01\x1b[31m\u202e\ufffe\U0010ffff\t\r\n"
    for path, body in (("/tokenize", {"prompt": odd}), ("/v1/completions", {"prompt": odd, "max_tokens": 2}),
                       ("/v1/chat/completions", chat(odd, max_tokens=2, stop=odd))):
        r = raw_post(http, path, body)
        assert r.status_code == 200, (path, r.text)
    ok_call = {**CALL, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    r = http.post("/tokenize", json={"messages": [{"role": "user", "content": "call f"}, ok_call]})
    assert r.status_code == 200 and r.json()["count"] > 0, r.text
    assert_healthy(http)


def test_tokenize_and_detokenize_are_bounded(app):
    http, cfg = app.http, app.config["applications"][0]["args"]
    limit = cfg.get("max_prompt_chars", 64 * 1024)
    assert_400_naming(http.post("/tokenize", json={"prompt": "a" * (limit + 1)}), "prompt")
    assert_400_naming(http.post("/detokenize", json={"tokens": [1] * (cfg["engine"]["max_model_len"] + 1)}),
                      "tokens")
    assert_400_naming(http.post("/detokenize", json={"tokens": [1, 10**9]}), "tokens")
    assert http.post("/detokenize", json={"tokens": [1, 2, 3]}).status_code == 200


def test_constraint_that_can_only_end_meets_min_tokens_and_ignore_eos(app):
    """A grammar that is complete after a few tokens (a JSON boolean, one of two words) with min_tokens or
    ignore_eos: the grammar allows only EOS, which those fields ban, so nothing can be sampled. It used to fail in
    the engine (HTTP 500); the completion now ends there with finish_reason "stop" (docs/validation.md), streamed
    or not, on both endpoints, and the grammar's output is whole."""
    http = app.http
    boolean = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}}
    for extra in (dict(min_tokens=30), dict(ignore_eos=True), dict(min_tokens=5, ignore_eos=True, n=2)):
        r = http.post("/v1/chat/completions", json=chat("yes?", max_tokens=40, response_format=boolean, **extra))
        assert r.status_code == 200, (extra, r.text)
        for choice in r.json()["choices"]:
            assert choice["finish_reason"] == "stop" and choice["message"]["content"] in ("true", "false"), r.text
        r = http.post("/v1/completions", json={"prompt": "answer:", "max_tokens": 40, "guided_choice": ["yes", "no"],
                                               **extra})
        assert r.status_code == 200, (extra, r.text)
        assert {(c["finish_reason"], c["text"] in ("yes", "no")) for c in r.json()["choices"]} == {("stop", True)}
    reasons = []
    with http.stream("POST", "/v1/chat/completions", json=chat("yes?", max_tokens=40, response_format=boolean,
                                                               ignore_eos=True, stream=True)) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                item = json.loads(line[6:])
                assert "error" not in item, item
                reasons += [c["finish_reason"] for c in item["choices"] if c["finish_reason"]]
    assert reasons == ["stop"]
    assert_healthy(http)


def test_per_key_limits_on_every_endpoint(app):
    """Per-key concurrency counts /v1/completions, /tokenize and /detokenize too (it counted chat alone), and the
    per-key KV hold charges n completions: with a share held, a second request of n = 2 is refused where the same
    request with n = 1 fits."""
    from ray import serve

    async def run():
        async with httpx.AsyncClient(base_url=app.url, timeout=TIMEOUT) as c:
            key, other = ({"Authorization": f"Bearer {k}"} for k in KEYS[:2])
            body = {"prompt": "long", "max_tokens": 300, "ignore_eos": True, "stream": True}
            held = [await c.send(c.build_request("POST", "/v1/completions", json=body, headers=key), stream=True)
                    for _ in range(PER_KEY_CONCURRENT)]
            over = [await c.post(path, json=b, headers=key) for path, b in (
                ("/v1/completions", {"prompt": "hi", "max_tokens": 2}), ("/tokenize", {"prompt": "hi"}),
                ("/detokenize", {"tokens": [1, 2]}), ("/v1/chat/completions", chat()))]
            others = [await c.post("/tokenize", json={"prompt": "hi"}, headers=other),
                      await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=other)]
            for r in held:
                await r.aclose()
            return [r.status_code for r in held], over, others

    held, over, others = asyncio.run(run())
    assert held == [200] * PER_KEY_CONCURRENT
    for r in over:
        assert_openai_error(r, 429)
    assert [r.status_code for r in others] == [200, 200], [r.text for r in others]

    per_token = serve.get_deployment_handle("DecoderPool", APP).kv_bytes_per_token.remote().result(timeout_s=30)
    share = int(0.4 * PER_KEY_KV / per_token)  # prompt + max_tokens of one completion: 0.4 of the key's share

    async def n_costs():
        async with httpx.AsyncClient(base_url=app.url, timeout=TIMEOUT, headers=AUTH) as c:
            body = {"prompt": "long", "max_tokens": share, "ignore_eos": True, "stream": True}
            first = await c.send(c.build_request("POST", "/v1/completions", json=body), stream=True)
            two = await c.post("/v1/completions", json={**body, "n": 2, "stream": False})  # 0.4 + 0.8 > 1
            one = await c.send(c.build_request("POST", "/v1/completions", json=body), stream=True)  # 0.8 fits
            statuses = first.status_code, one.status_code
            await first.aclose()
            await one.aclose()
            return statuses, two

    (first, one), two = asyncio.run(n_costs())
    assert first == one == 200
    assert_openai_error(two, 429)
    assert "KV" in two.json()["error"]["message"]
    assert_healthy(app.http)


# ---------------------------------------------------------------- replica loss (last: it restarts a replica)

def test_decoder_kill_under_load_is_retried(app):
    """kill -9 of the decoder replica under 6 streaming users: a request whose first token had not been sent
    succeeds (retried on the replacement, waited for up to stage_wait_s); one cut mid-stream ends with an error
    event and finish_reason "error"; none hangs; /health says 503 at once (within health_timeout_s, long before the
    replacement is up); every user is served again by the replacement; no 500 with internals."""
    results, stop, streaming = [], asyncio.Event(), asyncio.Event()
    killed = {"at": None}  # time.monotonic() of the kill

    async def user(c, i):
        key = {"Authorization": f"Bearer {KEYS[i % 3]}"}  # 2 users per key: within per_key_max_concurrent
        while not stop.is_set():
            body = chat(f"user {i}", max_tokens=30, ignore_eos=True, stream=True)
            got_token, events, reasons, started = False, [], [], time.monotonic()
            async with c.stream("POST", "/v1/chat/completions", json=body, headers=key) as r:
                if r.status_code != 200:
                    results.append(("refused", r.status_code, (await r.aread()).decode(), (i, started)))
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    item = json.loads(line[6:])
                    if "error" in item:
                        events.append(item["error"])
                    for ch in item.get("choices", []):
                        got_token |= bool(ch["delta"].get("content"))
                        if ch["finish_reason"]:
                            reasons.append(ch["finish_reason"])
                    if got_token:
                        streaming.set()
            results.append(("ok" if reasons == ["length"] else "cut", got_token, events, reasons, (i, started)))

    def served_again() -> bool:  # every user has completed a request begun after the kill (on the replacement)
        return killed["at"] is not None and {
            i for kind, *_, (i, started) in results if kind == "ok" and started > killed["at"]} == set(range(6))

    async def run():
        # Reads wait out a replacement's start (stage_wait_s); the bounds below end a hang, they do not time a run.
        async with httpx.AsyncClient(base_url=app.url, timeout=httpx.Timeout(60, read=STAGE_WAIT_S + 60)) as c:
            users = [asyncio.create_task(user(c, i)) for i in range(6)]
            await asyncio.wait_for(streaming.wait(), 300)  # users mid-stream
            os.kill(replica_pid("DecoderPool"), signal.SIGKILL)
            killed["at"] = time.monotonic()
            t0 = time.perf_counter()
            health = await c.get("/health")
            health_s = time.perf_counter() - t0
            deadline = time.monotonic() + STAGE_WAIT_S + 300
            while not served_again() and time.monotonic() < deadline and not any(u.done() for u in users):
                await asyncio.sleep(0.5)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*users), 600)
            return health, health_s

    health, health_s = asyncio.run(run())
    print(f"/health after kill: {health.status_code} in {health_s:.2f} s; results: "
          f"{sum(r[0] == 'ok' for r in results)} ok, {sum(r[0] == 'cut' for r in results)} cut mid-stream, "
          f"{sum(r[0] == 'refused' for r in results)} refused")
    assert_openai_error(health, 503)
    assert "decoder" in health.json()["error"]["message"].lower(), health.text
    assert not [r for r in results if r[0] == "refused"], results
    cut = [r for r in results if r[0] == "cut"]
    for _, got_token, events, reasons, _ in cut:
        assert got_token and events and events[0]["code"] == 503 and reasons == ["error"], (events, reasons)
    assert served_again(), f"not every user was served after the kill: {results}"
    assert_healthy(app.http)


@pytest.mark.serve_in_place  # the decoder replica is replaced: last among this module's tests
def test_a_dead_engine_loop_is_replaced(app):
    """The decoder engine's step loop dies (a fault injected between steps through the replica's handle, as a
    broken invariant would raise): its streams end with an error event within seconds, /health turns 503, Serve's
    health check (DecoderPool.check_health) replaces the replica, and the app serves again without a redeploy."""
    from ray import serve

    before = replica_pid("DecoderPool")
    ended, streaming = [], asyncio.Event()

    async def stream(c, i):
        body = chat(f"long story {i}", max_tokens=400, ignore_eos=True, stream=True)
        errors, reasons = [], []
        async with c.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    item = json.loads(line[6:])
                    errors += [item["error"]] if "error" in item else []
                    reasons += [ch["finish_reason"] for ch in item.get("choices", []) if ch["finish_reason"]]
                    streaming.set()
        ended.append(time.monotonic())
        return errors, reasons

    async def run():
        async with httpx.AsyncClient(base_url=app.url, timeout=TIMEOUT) as c:
            streams = [asyncio.create_task(stream(c, i)) for i in range(2)]
            await asyncio.wait_for(streaming.wait(), 300)
            handle = serve.get_deployment_handle("DecoderPool", APP)
            await asyncio.to_thread(lambda: handle.inject_fault.remote("fire drill").result(timeout_s=60))
            injected = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*streams), 120)
            return injected, results

    injected, results = asyncio.run(run())
    print(f"streams ended {[round(t - injected, 2) for t in ended]} s after the fault")
    for errors, reasons in results:
        assert errors and errors[0]["code"] == 503 and "engine stopped" in errors[0]["message"], errors
        assert reasons == ["error"], reasons
    assert max(ended) - injected < 30  # seconds, not the 400 tokens' time or a client's timeout
    # /health: 503 while the dead replica is still there (its stats raise) or once Serve has stopped it.
    status = helpers.wait_for(lambda: (r := app.http.get("/health")).status_code == 503 and r, 60, "/health 503")
    assert_openai_error(status, 503)
    helpers.wait_for(lambda: app.http.get("/health").status_code == 200, 600, "the replaced decoder", interval=1.0)

    def replaced() -> bool:
        try:
            return replica_pid("DecoderPool") != before
        except AssertionError:  # the old one still stopping beside the new one
            return False

    helpers.wait_for(replaced, 120, "only the new decoder replica")
    assert_healthy(app.http)

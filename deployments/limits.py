"""The ingress's ASGI guard, run before FastAPI reads a byte of the body: API key (401), per-key concurrency (429),
front-door admission (503: a place in the decoder pool's queue, deployments/admission.py), a body limit (413: from
Content-Length before reading, or, for a chunked body, as soon as the bytes received pass it) and a body-read timeout
(408), so a client that sends a huge body or half a body and then silence, or comes when the decoders are full, costs
a small, bounded amount and never blocks the others."""

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.exceptions import HTTPException

from . import api
from .admission import DecoderRoom, NoRoom
from .auth import KeyLedger, authenticate, bearer, load_keys
from .config import AppConfig

OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
# What per-key concurrency counts: every endpoint that does work (a new one joins here). The KV hold weighs a
# completion request by its cost (n x (prompt + max_tokens) tokens: Ingress._hold_kv).
PER_KEY_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize", "/detokenize"})
# What takes a place in the decoder pool's queue before its body is read (the handler finds it in request.state.place).
ADMITTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


@dataclass
class Guard:
    """The ingress replica's limits; each `Ingress` replica holds its own (`Ingress.guard`)."""

    keys: tuple[str, ...] = ()  # empty: no auth
    max_body_bytes: int = 32 * 2**20
    body_read_timeout_s: float = 10.0
    retry_after_s: int = 1
    ledger: KeyLedger = field(default_factory=KeyLedger)
    admission: DecoderRoom | None = None  # the replica's front door (None: the handler admits, or nothing does)

    @classmethod
    def from_config(cls, cfg: AppConfig) -> "Guard":
        """The limits `cfg` sets, with the API keys from the environment variable it names."""
        return cls(load_keys(cfg.api_key_env), cfg.max_body_bytes, cfg.body_read_timeout_s, cfg.retry_after_s,
                   KeyLedger(cfg.per_key_max_concurrent, cfg.per_key_max_kv_bytes))

    def client_key(self, scope) -> str | None:
        """The key id of an authenticated request; without auth, the client address (None: refuse with 401)."""
        if not self.keys:
            client = scope.get("client")
            return f"addr-{client[0]}" if client else "anonymous"
        return authenticate(bearer(scope.get("headers", [])), self.keys)


def route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return "/" + path.lstrip("/")


async def send_error(send, status: int, message: str, headers: dict | None = None) -> None:
    body = json.dumps(api.error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


class GuardMiddleware:
    """`guard_of()` gives the Guard of the replica serving the request (None: no limits)."""

    def __init__(self, app, guard_of: Callable[[], Guard | None]):
        self.app, self.guard_of = app, guard_of

    async def __call__(self, scope, receive, send):
        guard = self.guard_of() if scope["type"] == "http" else None
        if guard is None:
            return await self.app(scope, receive, send)
        path = route_path(scope)
        key = guard.client_key(scope)
        if key is None and path not in OPEN_PATHS:
            return await send_error(send, 401, "a valid API key is required (Authorization: Bearer KEY)",
                                    {"WWW-Authenticate": "Bearer"})
        length = content_length(scope)
        if length is not None and length < 0:
            return await send_error(send, 400, "invalid Content-Length header")
        if length is not None and length > guard.max_body_bytes:
            return await send_error(send, 413, f"the request body is larger than {guard.max_body_bytes} bytes")
        counted = path in PER_KEY_PATHS
        if counted and not guard.ledger.enter(key):
            return await send_error(send, 429, "too many concurrent requests for this API key",
                                    {"Retry-After": str(guard.retry_after_s)})
        state = scope.setdefault("state", {})
        state["client_key"] = key
        place = None
        try:
            if guard.admission is not None and path in ADMITTED_PATHS and scope["method"] == "POST":
                try:  # before the body is read or parsed: a refusal costs no parsing, preprocessing or stage call
                    state["place"] = place = await guard.admission.admit()
                except NoRoom as exc:
                    return await send_error(send, 503, str(exc), {"Retry-After": str(guard.retry_after_s)})
            await self.app(scope, limited_receive(receive, guard, scope["method"]), send)
        finally:
            if counted:
                guard.ledger.leave(key)
            guard.ledger.release_kv(key, state.pop("kv_bytes", 0))
            if place is not None:
                place.release()  # the request ended (or failed, or its client left): given back if still held


def limited_receive(receive, guard: Guard, method: str):
    """`receive` with the body capped at max_body_bytes (counted as it arrives: a chunked body has no Content-Length)
    and the whole body due within body_read_timeout_s; after the body, messages (the disconnect) pass untouched."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + guard.body_read_timeout_s
    read, done = 0, method in ("GET", "HEAD", "OPTIONS", "DELETE")

    async def guarded():
        nonlocal read, done
        if done:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
        except asyncio.TimeoutError:
            done = True
            raise HTTPException(408, f"the request body did not arrive within {guard.body_read_timeout_s} s") from None
        if message["type"] == "http.request":
            read += len(message.get("body", b""))
            if read > guard.max_body_bytes:
                done = True
                raise HTTPException(413, f"the request body is larger than {guard.max_body_bytes} bytes")
            done = not message.get("more_body", False)
        else:
            done = True
        return message

    return guarded

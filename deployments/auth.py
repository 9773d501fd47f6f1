"""API keys (`Authorization: Bearer`, from the environment variable the config names) and per-key fairness: limits on
concurrent requests and on KV bytes held, so one client cannot take the whole decoder pool. Keys are never logged."""

import hashlib
import hmac
import os
import threading
from dataclasses import dataclass, field


def load_keys(env_name: str) -> tuple[str, ...]:
    """The comma-separated keys in `env_name` (empty: auth off). k8s fills the variable from a Secret."""
    return tuple(k.strip() for k in os.environ.get(env_name, "").split(",") if k.strip())


def bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key (for accounting and logs)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def authenticate(token: str | None, keys: tuple[str, ...]) -> str | None:
    """The key's id when `token` is one of `keys` (compared in constant time), else None."""
    if token is None:
        return None
    match = False
    for k in keys:
        match |= hmac.compare_digest(token.encode(), k.encode())
    return key_id(token) if match else None


@dataclass
class KeyLedger:
    """What each client key holds now. `max_concurrent`/`max_kv_bytes` of 0 mean no limit."""

    max_concurrent: int = 0
    max_kv_bytes: int = 0
    concurrent: dict[str, int] = field(default_factory=dict)
    kv_bytes: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self, key: str) -> bool:
        with self.lock:
            n = self.concurrent.get(key, 0)
            if self.max_concurrent and n >= self.max_concurrent:
                return False
            self.concurrent[key] = n + 1
            return True

    def leave(self, key: str) -> None:
        with self.lock:
            self.concurrent[key] = self.concurrent.get(key, 1) - 1
            if self.concurrent[key] <= 0:
                del self.concurrent[key]

    def hold_kv(self, key: str, nbytes: int) -> bool:
        """Reserve `nbytes` of KV for the key; False (nothing held) past its limit. A lone request always fits."""
        with self.lock:
            held = self.kv_bytes.get(key, 0)
            if self.max_kv_bytes and held and held + nbytes > self.max_kv_bytes:
                return False
            self.kv_bytes[key] = held + nbytes
            return True

    def release_kv(self, key: str, nbytes: int) -> None:
        with self.lock:
            left = self.kv_bytes.get(key, 0) - nbytes
            if left > 0:
                self.kv_bytes[key] = left
            else:
                self.kv_bytes.pop(key, None)

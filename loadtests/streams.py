"""Clients that stream chat completions without pause and sort every request into ok, failed or cut: the load that
runs while a test redeploys, scales down or kills the head node.

- ok: HTTP 200, every token up to its finish_reason ("length" or "stop"), then `data: [DONE]`;
- failed: no 200 (an HTTP error status, or the connection refused or reset before the header);
- cut: a 200 whose stream ended early: an error event, finish_reason "error", or the connection lost mid-stream.
"""

import json
import threading
import time
from dataclasses import asdict, dataclass, field

import httpx

from loadtests.workload import chat_body, data_url, image_set


@dataclass
class Outcome:
    client: int
    started: float  # time.monotonic()
    ended: float
    kind: str  # "ok" | "failed" | "cut"
    status: int | None  # HTTP status; None when no response came
    tokens: int = 0  # content chunks received
    finish_reason: str | None = None
    detail: str = ""


@dataclass
class StreamLoad:
    """`clients` threads, each streaming one request after another to `url` until stop(); `max_tokens` decoded
    (ignore_eos) per request, about one of the shapes pictures each."""

    url: str
    clients: int = 8
    max_tokens: int = 200
    timeout_s: float = 120.0
    pause_after_failure_s: float = 0.2  # a refused connection is retried this soon, not in a tight loop
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self):
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.images = [data_url(p) for p in image_set()[1]]
        self.active = 0

    def start(self) -> "StreamLoad":
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(i,), daemon=True, name=f"stream-client-{i}")
            t.start()
            self.threads.append(t)
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """Let every client finish the request it is in (no stream is abandoned by the load itself), then stop."""
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout_s if timeout_s is not None else self.timeout_s + 10)

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=httpx.Timeout(self.timeout_s, connect=5.0)) as http:
            n = 0
            while not self.stop_event.is_set():
                body = chat_body(None, "Describe this image.", self.images[(i + n) % len(self.images)],
                                 self.max_tokens, ignore_eos=True)
                n += 1
                outcome = self.one(http, i, body)
                with self.lock:
                    self.outcomes.append(outcome)
                if outcome.kind == "failed":
                    self.stop_event.wait(self.pause_after_failure_s)

    def one(self, http: httpx.Client, client: int, body: dict) -> Outcome:
        t0 = time.monotonic()
        status, tokens, finish, done, detail = None, 0, None, False, ""
        with self.lock:
            self.active += 1
        try:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                status = r.status_code
                if status != 200:
                    detail = r.read().decode(errors="replace")[:300]
                    return Outcome(client, t0, time.monotonic(), "failed", status, detail=detail)
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            detail = json.dumps(event["error"])[:300]
                            continue
                        for choice in event.get("choices", []):
                            tokens += bool(choice.get("delta", {}).get("content"))
                            finish = choice.get("finish_reason") or finish
        except (httpx.HTTPError, OSError) as exc:
            detail = f"{type(exc).__name__}: {exc}"[:300]
            kind = "failed" if status is None else "cut"
            return Outcome(client, t0, time.monotonic(), kind, status, tokens, finish, detail)
        finally:
            with self.lock:
                self.active -= 1
        ok = done and finish in ("length", "stop") and not detail
        return Outcome(client, t0, time.monotonic(), "ok" if ok else "cut", status, tokens, finish, detail)

    def snapshot(self) -> list[Outcome]:
        with self.lock:
            return list(self.outcomes)

    def summary(self, since: float | None = None, until: float | None = None) -> dict:
        """Counts of the requests that ended within [since, until] (monotonic), and a few of the bad ones."""
        picked = [o for o in self.snapshot() if (since is None or o.ended >= since) and
                  (until is None or o.ended <= until)]
        bad = [o for o in picked if o.kind != "ok"]
        return {"requests": len(picked), "ok": sum(o.kind == "ok" for o in picked),
                "failed": sum(o.kind == "failed" for o in picked), "cut": sum(o.kind == "cut" for o in picked),
                "statuses": sorted({o.status for o in picked if o.status is not None}),
                "examples": [asdict(o) for o in bad[:3]]}

    def wait_for_ok(self, count: int, after: float, timeout_s: float) -> float | None:
        """Block until `count` requests that started after `after` have ended ok; the time that happened, or None."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ended = sorted(o.ended for o in self.snapshot() if o.kind == "ok" and o.started >= after)
            if len(ended) >= count:
                return ended[count - 1]
            time.sleep(0.2)
        return None

"""Locust load test: OpenAI-style streaming chat requests with images against crosstrim (or any OpenAI server).

Records TTFT, inter-token latency and output tokens (plus, from crosstrim's `trim` field, the cross-attention KV
held and the bytes shipped per request) as custom locust metrics, request_type "METRIC"; a non-2xx answer or a
malformed stream (bad JSON, an error object, no finish_reason, no [DONE]) is a failure. Example:
  locust -f loadtests/locustfile.py --headless -u 8 -r 4 -t 60s --host http://127.0.0.1:8000 --csv out \\
      --trim on --image-mix 1,4 --max-tokens 32
"""

import json
import random
import sys
import time
from pathlib import Path

from locust import FastHttpUser, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent))  # locust does this too; importers of this file may not
from workload import PROMPTS, chat_body, data_url, image_set, trim_field


@events.init_command_line_parser.add_listener
def _(parser):
    parser.add_argument("--trim", choices=["on", "off", "default"], default="default",
                        help="on: Trimmed-Llama at --k-ratio; off: keep every visual token; default: the server's")
    parser.add_argument("--k-ratio", type=float, default=None)
    parser.add_argument("--image-mix", default="1,4", help="tile counts to draw images from (1, 2, 4); 0 = text only")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="default: the first model GET /v1/models lists")
    parser.add_argument("--images-per-tile-count", type=int, default=4)
    parser.add_argument("--tile-px", type=int, default=64,
                        help="the model's tile size (tiny models 64, the bench model 448, Llama-3.2-Vision 560)")
    parser.add_argument("--prompt", default=None, help="one prompt for every request (default: drawn from a set)")
    parser.add_argument("--ignore-eos", action="store_true", help="decode exactly --max-tokens (an extension)")


IMAGES: dict[int, list[str]] = {}


@events.init.add_listener
def _build_images(environment, **_kwargs):
    opts = environment.parsed_options
    pngs = image_set(opts.tile_px if opts else 64, opts.images_per_tile_count if opts else 4)
    IMAGES.update({tiles: [data_url(p) for p in ps] for tiles, ps in pngs.items()})


def _fire(environment, name: str, value: float):
    environment.events.request.fire(request_type="METRIC", name=name, response_time=value, response_length=0,
                                    exception=None, context={})


class StreamError(Exception):
    """The 200 stream was not a well-formed chat completion stream."""


class ChatUser(FastHttpUser):
    """One streaming chat completion at a time, with a picture drawn from the configured mix."""

    def on_start(self):
        opts = self.environment.parsed_options
        self.mix = [int(x) for x in opts.image_mix.split(",")]
        self.rng = random.Random()
        self.model = opts.model
        if self.model is None:
            with self.client.get("/v1/models", name="models", catch_response=True) as resp:
                self.model = resp.json()["data"][0]["id"] if resp.status_code == 200 else "unknown"

    def _body(self) -> dict:
        opts = self.environment.parsed_options
        tiles = self.rng.choice(self.mix)
        image = self.rng.choice(IMAGES[tiles]) if tiles else None
        return chat_body(self.model, opts.prompt or self.rng.choice(PROMPTS), image, opts.max_tokens,
                         trim_field(opts.trim, opts.k_ratio), opts.ignore_eos)

    @task
    def chat(self):
        start = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=self._body(), stream=True, catch_response=True,
                              name="chat/completions") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200] if resp.text else ''}")
                return
            try:
                stream = read_stream(_lines(resp))
            except StreamError as exc:
                resp.failure(f"malformed stream: {exc}")
                return
            resp.success()
        self._record(start, stream)

    def _record(self, start: float, stream: dict) -> None:
        env = self.environment
        times = stream["token_times"]
        if times:
            _fire(env, "ttft_ms", (times[0] - start) * 1e3)
        for a, b in zip(times, times[1:]):
            _fire(env, "itl_ms", (b - a) * 1e3)
        _fire(env, "output_chunks", len(times))
        usage = stream["usage"]
        _fire(env, "output_tokens", usage["completion_tokens"] if usage else len(times))
        trim = stream["trim"]
        if trim:  # crosstrim's extension: what the decoder held and what crossed the trimmer -> decoder hop
            _fire(env, "cross_kv_kib", trim["cross_kv_bytes"] / 1024)
            if "shipped_bytes" in trim:
                _fire(env, "shipped_kib", trim["shipped_bytes"] / 1024)
                _fire(env, "hop_ms", trim["hop_ms"])


def read_stream(lines) -> dict:
    """Parse an SSE chat completion stream: arrival times of content deltas, usage, trim; StreamError if it is
    not a well-formed one."""
    token_times, usage, trim, finish, done = [], None, None, None, False
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(payload)
        except ValueError as exc:
            raise StreamError(f"bad JSON: {payload[:80]!r}") from exc
        if not isinstance(chunk, dict):
            raise StreamError(f"not an object: {payload[:80]!r}")
        if "error" in chunk:  # a failure after the 200 header travels in the stream
            raise StreamError(f"error in stream: {str(chunk['error'])[:200]}")
        choices = chunk.get("choices")
        if choices is None:
            raise StreamError(f"a chunk without choices: {payload[:80]!r}")
        if choices:
            choice = choices[0]
            if choice.get("delta", {}).get("content"):
                token_times.append(time.perf_counter())
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
        trim = chunk.get("trim") or trim
    if not done:
        raise StreamError("ended without data: [DONE]")
    if finish is None:
        raise StreamError("no chunk carried a finish_reason")
    return {"token_times": token_times, "usage": usage, "trim": trim, "finish_reason": finish}


def _lines(resp):
    """The streamed body split into lines, read in small pieces so a token's arrival is timed when it comes."""
    buf = b""
    for piece in resp.iter_content(chunk_size=64):
        buf += piece if isinstance(piece, bytes) else piece.encode()
        while b"\n" in buf:  # split bytes, not text: a piece may end inside a UTF-8 character
            line, buf = buf.split(b"\n", 1)
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
    if buf:
        yield buf.decode("utf-8", errors="replace")

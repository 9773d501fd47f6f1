"""Locust load test: OpenAI-style streaming chat requests with images against crosstrim (or any OpenAI server).

Records TTFT, inter-token latency and output tokens as custom locust metrics; a non-2xx answer or a malformed
stream is a failure. Example:
  locust -f loadtests/locustfile.py --headless -u 8 -r 4 -t 60s --host http://127.0.0.1:8000 --csv out \\
      --trim on --image-mix 1,4 --max-tokens 32
"""

import base64
import io
import json
import random
import time

from locust import FastHttpUser, events, task
from PIL import Image, ImageDraw

PROMPTS = [
    "What colour is the shape in the top left corner?",
    "Describe this image.",
    "How many shapes are there?",
    "Where is the red square?",
    "Which shape is the largest?",
]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def make_image(seed: int, tiles_wide: int, tiles_high: int, tile: int = 64) -> bytes:
    """A seeded picture of coloured shapes, sized to span the given number of tiles."""
    rng = random.Random(seed)
    img = Image.new("RGB", (tiles_wide * tile, tiles_high * tile), "white")
    draw = ImageDraw.Draw(img)
    for _ in range(3 * tiles_wide * tiles_high):
        x, y, r = rng.randrange(img.width), rng.randrange(img.height), rng.randrange(6, 20)
        box = [x - r, y - r, x + r, y + r]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=rng.choice(COLOURS))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


TILE_SHAPES = {1: (1, 1), 2: (2, 1), 4: (2, 2)}


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@events.init_command_line_parser.add_listener
def _(parser):
    parser.add_argument("--trim", choices=["on", "off", "default"], default="default",
                        help="on: Trimmed-Llama at --k-ratio; off: keep every visual token; default: the server's")
    parser.add_argument("--k-ratio", type=float, default=None)
    parser.add_argument("--image-mix", default="1,4", help="tile counts to draw images from (1, 2, 4); 0 = text only")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="default: the first model GET /v1/models lists")
    parser.add_argument("--images-per-tile-count", type=int, default=4)


IMAGES: dict[int, list[str]] = {}


@events.init.add_listener
def _build_images(environment, **_kwargs):
    opts = environment.parsed_options
    count = opts.images_per_tile_count if opts else 4
    for tiles in (1, 2, 4):
        IMAGES[tiles] = [data_url(make_image(1000 * tiles + i, *TILE_SHAPES[tiles])) for i in range(count)]


def _fire(environment, name: str, value: float, ok: bool = True):
    environment.events.request.fire(request_type="METRIC", name=name, response_time=value, response_length=0,
                                    exception=None if ok else RuntimeError(name), context={})


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
        content = [{"type": "text", "text": self.rng.choice(PROMPTS)}]
        if tiles:
            content.insert(0, {"type": "image_url", "image_url": {"url": self.rng.choice(IMAGES[tiles])}})
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "stream": True,
                "max_tokens": opts.max_tokens, "temperature": 0.0}
        if opts.trim == "off":
            body["trim"] = {"enabled": False}
        elif opts.trim == "on":
            body["trim"] = {"k_ratio": opts.k_ratio} if opts.k_ratio else {"policy": "topk_union"}
        return body

    @task
    def chat(self):
        start = time.perf_counter()
        first = last = None
        gaps, tokens, done = [], 0, False
        with self.client.post("/v1/chat/completions", json=self._body(), stream=True, catch_response=True,
                              name="chat/completions") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200] if resp.text else ''}")
                return
            try:
                for line in _lines(resp):
                    if not line.startswith("data: "):
                        continue
                    payload = line[len("data: "):]
                    if payload == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(payload)
                    delta = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                    if delta:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last = now
                        tokens += 1
            except (ValueError, KeyError, IndexError) as exc:
                resp.failure(f"malformed stream: {exc}")
                return
            if not done:
                resp.failure("stream ended without data: [DONE]")
                return
            resp.success()
        if first is not None:
            _fire(self.environment, "ttft_ms", (first - start) * 1e3)
        for gap in gaps:
            _fire(self.environment, "itl_ms", gap * 1e3)
        _fire(self.environment, "output_chunks", tokens)


def _lines(resp):
    """The streamed body split into lines, read in small pieces so a token's arrival is timed when it comes."""
    buf = ""
    for piece in resp.iter_content(chunk_size=64):
        buf += piece.decode("utf-8", errors="replace") if isinstance(piece, bytes) else piece
        while "\n" in buf:
            line, buf = buf.split("\n", 1)
            yield line.rstrip("\r")
    if buf:
        yield buf

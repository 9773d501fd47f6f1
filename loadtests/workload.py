"""The load tests' workload: a small fixed set of generated pictures and prompts, and the chat request body.

No locust import here (it monkey-patches the standard library): `crosstrim bench e2e` feeds HF generate the very
same images and prompt.
"""

import base64
import io
import random

from PIL import Image, ImageDraw

PROMPTS = [
    "What colour is the shape in the top left corner?",
    "Describe this image.",
    "How many shapes are there?",
    "Where is the red square?",
    "Which shape is the largest?",
]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
TILE_SHAPES = {1: (1, 1), 2: (2, 1), 4: (2, 2)}  # tiles -> (wide, high): the processor picks that canvas


def make_image(seed: int, tiles_wide: int, tiles_high: int, tile: int = 64) -> bytes:
    """A seeded PNG of coloured shapes, sized to span the given number of tiles of `tile` pixels."""
    rng = random.Random(seed)
    img = Image.new("RGB", (tiles_wide * tile, tiles_high * tile), "white")
    draw = ImageDraw.Draw(img)
    scale = tile / 64
    for _ in range(3 * tiles_wide * tiles_high):
        x, y, r = rng.randrange(img.width), rng.randrange(img.height), int(rng.randrange(6, 20) * scale)
        box = [x - r, y - r, x + r, y + r]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=rng.choice(COLOURS))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_set(tile_px: int = 64, per_tile_count: int = 4) -> dict[int, list[bytes]]:
    """tiles (1, 2, 4) -> `per_tile_count` distinct PNGs of that many tiles; the same bytes on every call."""
    return {tiles: [make_image(1000 * tiles + i, *TILE_SHAPES[tiles], tile=tile_px) for i in range(per_tile_count)]
            for tiles in TILE_SHAPES}


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def trim_field(trim: str, k_ratio: float | None) -> dict | None:
    """The request's `trim` extension for --trim on|off|default (default: none, the server decides)."""
    if trim == "off":
        return {"enabled": False}
    if trim == "on":
        return {"k_ratio": k_ratio} if k_ratio else {"policy": "topk_union"}
    return None


def chat_body(model: str | None, prompt: str, image_url: str | None, max_tokens: int, trim: dict | None = None,
              ignore_eos: bool = False) -> dict:
    """A streaming, greedy chat completion asking for usage at the end (the exact output token count)."""
    content = [{"type": "text", "text": prompt}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "temperature": 0.0}
    if ignore_eos:
        body["ignore_eos"] = True  # an extension (vLLM's too): every request decodes exactly max_tokens
    if trim is not None:
        body["trim"] = trim
    return body

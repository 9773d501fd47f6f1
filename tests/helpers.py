"""Shared test inputs (generated images of 1, 2 and 4 tiles, a few prompts) and checks on a running Serve app."""

import time

from PIL import Image

from pipeline.quality.synthetic import noise_image

PROMPTS = ["What colour is the square?", "describe this image please", "where is the red one", "count the shapes"]


image = noise_image


def images() -> dict[str, Image.Image]:
    # The tiny model's tiles are 64 px: 64x64 is one tile, 100x40 two, 128x128 four.
    return {"1tile": image(64, 64, 0), "2tile": image(100, 40, 1), "4tile": image(128, 128, 2)}


def decoder_stats(http) -> dict:
    """One decoder replica's engine stats from the app's /stats (http: an httpx.Client on the app)."""
    r = http.get("/stats")
    assert r.status_code == 200, r.text
    return r.json()["decoder"]


def assert_healthy(http, body: dict, kv_wait_s: float = 0.0):
    """/health is ok, `body` gets a 200, and the decoder holds no KV (within kv_wait_s)."""
    assert http.get("/health").json() == {"status": "ok"}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + kv_wait_s
    while decoder_stats(http)["kv_used_bytes"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert decoder_stats(http)["kv_used_bytes"] == 0

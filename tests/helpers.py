"""Shared test inputs (generated images of 1, 2 and 4 tiles, a few prompts), the oracle's vision tap, and checks on
a running Serve app."""

import time
from contextlib import contextmanager
from types import MethodType

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.mllama.modeling_mllama import MllamaVisionEncoder

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


@contextmanager
def _local_encoder_forward(model, forward):
    """`forward` as the instance attribute over the forward of `model`'s local vision encoder, for the context."""
    encoder = model.model.vision_model.transformer
    before = encoder.__dict__.get("forward")
    encoder.forward = forward
    try:
        yield model
    finally:
        if before is None:
            del encoder.forward
        else:
            encoder.forward = before


def reference_vision_tap(model):
    """HF's model (MllamaForConditionalGeneration) with its vision tower tapped as Meta's reference does, while
    the context lasts: llama-models' VisionEncoder (`return_intermediate`) keeps the input of each tapped layer,
    transformers 5.24 keeps its output. Written here, independently of pipeline/model/encoder.py, as a loop over
    HF's own layer modules."""
    encoder = model.model.vision_model.transformer

    def forward(hidden_states, attention_mask=None):
        inputs = []
        for layer in encoder.layers:
            inputs.append(hidden_states)  # hidden_states[i] is what layer i reads
            hidden_states = layer(hidden_states=hidden_states, attention_mask=attention_mask)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=tuple(inputs))

    return _local_encoder_forward(model, forward)


def transformers_vision_tap(model):
    """HF's model running transformers' own MllamaVisionEncoder.forward (each layer's output), even on a model
    whose encoder class crosstrim swapped."""
    encoder = model.model.vision_model.transformer
    return _local_encoder_forward(model, MethodType(MllamaVisionEncoder.forward, encoder))


@torch.inference_mode()
def hf_visual_features(model, prepared) -> torch.Tensor:
    """Projected visual features as HF's MllamaModel.forward computes them: (images, tiles * patches, hidden)."""
    out = model.model.vision_model(pixel_values=prepared.pixel_values, aspect_ratio_ids=prepared.aspect_ratio_ids,
                                   aspect_ratio_mask=prepared.aspect_ratio_mask).last_hidden_state
    _, images, tiles, patches, _ = out.shape
    return model.model.multi_modal_projector(out).reshape(images, tiles * patches, -1)

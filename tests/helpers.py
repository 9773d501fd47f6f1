"""Shared test inputs (generated images of 1, 2 and 4 tiles, a few prompts), the repo's scripts, waits bounded by
progress, the oracle's departures from HF (Meta's vision tap and blind rows), and checks on a running Serve app."""

import asyncio
import base64
import importlib.util
import io
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import MethodType

import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer, MllamaVisionEncoder

from pipeline.quality.synthetic import noise_image

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What colour is the square?", "describe this image please", "where is the red one", "count the shapes"]


image = noise_image


def images() -> dict[str, Image.Image]:
    # The tiny model's tiles are 64 px: 64x64 is one tile, 100x40 two, 128x128 four.
    return {"1tile": image(64, 64, 0), "2tile": image(100, 40, 1), "4tile": image(128, 128, 2)}


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def script(name: str):
    """scripts/NAME.py imported as a module (scripts/ is not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """predicate()'s first truthy value, polled every `interval` s; an AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def decoder_stats(http, replicas: int = 1) -> dict:
    """The decoder pool's engine stats from the app's /stats (http: an httpx.Client on the app), once `replicas`
    replicas are in them: /stats leaves out a replica that does not answer within its 2 s (a busy machine), so it is
    asked again (the bound ends a hang, not a slow run)."""
    def answered():
        r = http.get("/stats")
        assert r.status_code == 200, r.text
        stats = r.json()["decoder"]
        return stats if stats["replicas"] >= replicas else None

    return wait_for(answered, 300, f"{replicas} decoder replicas in /stats", interval=0.5)


async def while_decoding(work, http, stall_s: float = 180.0, period_s: float = 2.0):
    """Await `work` (a coroutine on the app) for as long as the decoder makes progress: an AssertionError only if
    its tokens_generated stays still for `stall_s` seconds while `work` runs. A busy machine slows a run down
    but never fails it; a hung decoder still does. Requests under `work` use no read timeout of their own."""
    task = asyncio.ensure_future(work)
    seen, last_change = None, time.monotonic()
    while True:
        done, _ = await asyncio.wait({task}, timeout=period_s)
        if done:
            return task.result()
        generated = (await asyncio.to_thread(decoder_stats, http))["tokens_generated"]
        if generated != seen:
            seen, last_change = generated, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            task.cancel()
            raise AssertionError(f"the decoder made no progress for {stall_s}s (tokens_generated stayed {seen})")


def assert_healthy(http, body: dict, kv_wait_s: float = 0.0):
    """/health is ok, `body` gets a 200, and the decoder holds no KV (within kv_wait_s)."""
    health = http.get("/health")
    assert health.json() == {"status": "ok"}, health.text
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


@contextmanager
def reference_blind_rows(model):
    """HF's model with rows that see no image given no cross-attention output, as Meta's reference does
    (llama-models' CrossAttentionTransformerBlock multiplies the attention branch by full_text_row_masked_out_mask;
    transformers 5.24 only the MLP branch), while the context lasts. Written here, independently of
    pipeline/model/blind_rows.py, as an instance forward over HF's own submodules."""
    layers = [la for la in model.model.language_model.layers if isinstance(la, MllamaCrossAttentionDecoderLayer)]

    def forward(layer, hidden_states, cross_attention_states=None, cross_attention_mask=None,
                full_text_row_masked_out_mask=None, cache=None, **kwargs):
        for unused in ("attention_mask", "position_ids", "use_cache", "position_embeddings"):
            kwargs.pop(unused, None)
        out, _ = layer.cross_attn(hidden_states=layer.input_layernorm(hidden_states),
                                  attention_mask=cross_attention_mask,
                                  cross_attention_states=cross_attention_states, cache=cache, **kwargs)
        row = full_text_row_masked_out_mask[:, 0] if full_text_row_masked_out_mask is not None else 1.0
        hidden_states = hidden_states + layer.cross_attn_attn_gate.tanh() * (out * row)
        mlp = layer.mlp(layer.post_attention_layernorm(hidden_states)) * row
        return hidden_states + layer.cross_attn_mlp_gate.tanh() * mlp

    for layer in layers:
        layer.forward = MethodType(forward, layer)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward


def hf_blind_rows(model):
    """HF's model running transformers' own cross-attention decoder layer forward (blind rows attend), even on a
    model whose layer class crosstrim swapped."""
    layers = [la for la in model.model.language_model.layers if isinstance(la, MllamaCrossAttentionDecoderLayer)]

    @contextmanager
    def context():
        for layer in layers:
            layer.forward = MethodType(MllamaCrossAttentionDecoderLayer.forward, layer)
        try:
            yield model
        finally:
            for layer in layers:
                del layer.forward

    return context()


@contextmanager
def meta_reference(model):
    """The oracle: HF's model where it departs from Meta's reference made to follow it (the vision tap, blind
    rows), each by this file's own implementation."""
    with ExitStack() as stack:
        stack.enter_context(reference_vision_tap(model))
        stack.enter_context(reference_blind_rows(model))
        yield model


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

"""The GPU configs ask for enough GPUs: each stage's weights (counted on the meta device from the model's published
dims, with the loader's own per-stage selection and, for `devices: auto`, its own layer placement over the replica's
GPUs) plus the decoder's KV arenas (the engine's own KVCache, built on the meta device) fit every GPU it holds."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import MllamaConfig

from pipeline.engine.kv_cache import KVCache
from pipeline.model.placement import placement_of
from pipeline.model.weights import held_layers, meta_model, wanted

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GPU_BYTES = 80 * 10**9  # the configs assume 80 GB GPUs (A100/H100), as their headers say
VISION = dict(hidden_size=1280, attention_heads=16, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
              intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680, image_size=560, patch_size=14,
              max_num_tiles=4)
# From meta-llama/Llama-3.2-{11B,90B}-Vision-Instruct's config.json.
TEXT = {
    "llama-3.2-11b-vision.yaml": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                      intermediate_size=14336, num_hidden_layers=40, vocab_size=128256,
                                      cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38]),
    "llama-3.2-90b-vision.yaml": dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                                      intermediate_size=28672, num_hidden_layers=100, vocab_size=128256,
                                      cross_attention_layers=list(range(3, 100, 5))),
}
STAGES = {"VisionEncoder": ("vision",), "Trimmer": ("trim",), "DecoderPool": ("text",)}


def param_counts(config: MllamaConfig) -> dict[str, int]:
    return {n: p.numel() for n, p in meta_model(config).named_parameters()}


def stage_bytes(config: MllamaConfig, counts: dict[str, int], parts: tuple[str, ...], itemsize: int) -> int:
    need = wanted(config, parts)
    return sum(c for n, c in counts.items() if need(n)) * itemsize


def per_gpu_bytes(config: MllamaConfig, counts: dict[str, int], parts: tuple[str, ...], itemsize: int,
                  gpus: int, kv_budget: int) -> list[int]:
    """Weights and KV arena bytes on each of the replica's GPUs, placed as the loader and engine place them."""
    text = config.text_config
    need = wanted(config, parts)
    held = held_layers(config, parts, counts)  # as the loader places them: only the layers the stage holds count
    placement, index = placement_of(text.num_hidden_layers, gpus, held)
    out = [0] * gpus
    for n, c in counts.items():
        if need(n):
            out[index(n)] += c * itemsize
    if kv_budget:
        kv = KVCache(kv_budget, text.num_hidden_layers, text.cross_attention_layers, text.num_key_value_heads,
                     text.hidden_size // text.num_attention_heads, torch.bfloat16 if itemsize == 2 else torch.float32,
                     "meta", 256, "page", placement=placement, devices=["meta"] * gpus)
        for g, arena in enumerate(kv.arenas):
            out[g] += arena.data.numel() * arena.data.element_size()
    return out


@pytest.mark.parametrize("name", sorted(TEXT))
def test_weights_plus_kv_fit_the_gpus_each_stage_asks_for(name):
    app = yaml.safe_load((CONFIGS / name).read_text())["applications"][0]
    args, deployments = app["args"], {d["name"]: d for d in app["deployments"]}
    itemsize = getattr(torch, args["model"]["dtype"]).itemsize
    config = MllamaConfig(vision_config=VISION, text_config=TEXT[name], image_token_index=128256)
    counts = param_counts(config)
    for stage, parts in STAGES.items():
        gpus = deployments[stage]["ray_actor_options"]["num_gpus"]
        kv = args["engine"]["kv_budget_bytes"] if stage == "DecoderPool" else 0
        if gpus > 1:  # layers split over the replica's GPUs: each GPU must hold its share
            assert args["model"].get("devices") == "auto", f"{stage} holds {gpus} GPUs but the model is not placed"
            shares = per_gpu_bytes(config, counts, parts, itemsize, int(gpus), kv)
        else:
            shares = [stage_bytes(config, counts, parts, itemsize) + kv]
        print(f"{name} {stage} on {gpus} x 80 GB: per GPU {[round(b / 1e9, 1) for b in shares]} GB (weights + KV)")
        assert max(shares) <= min(gpus, 1) * GPU_BYTES * 0.95, f"{stage} needs {max(shares) / 1e9:.1f} GB on a GPU"
        assert sum(shares) >= stage_bytes(config, counts, parts, itemsize) + kv * 0.99  # nothing left unplaced
    # The trimmer holds embeddings, layers through the first cross layer and the later cross layers' K/V only.
    text = config.text_config
    first, later = text.cross_attention_layers[0], text.cross_attention_layers[1:]
    hd, kv_width = text.hidden_size // text.num_attention_heads, text.num_key_value_heads
    layer_params = sum(c for n, c in counts.items() if n.startswith("model.language_model.layers.0."))
    embed = text.vocab_size * text.hidden_size + 8 * text.hidden_size  # 8 extra: the image token rows
    cross_kv = len(later) * (2 * text.hidden_size * kv_width * hd + hd)  # k_proj, v_proj, k_norm
    first_cross = sum(c for n, c in counts.items() if n.startswith(f"model.language_model.layers.{first}."))
    assert stage_bytes(config, counts, ("trim",), 1) == embed + first * layer_params + first_cross + cross_kv
    # The published sizes: ~10.7 B parameters for the 11B, ~88.8 B for the 90B (lm_head counted in the decoder).
    expected = {"llama-3.2-11b-vision.yaml": 10.6e9, "llama-3.2-90b-vision.yaml": 88.6e9}[name]
    decoder_and_vision = stage_bytes(config, counts, ("vision", "text"), 1)
    assert decoder_and_vision == pytest.approx(expected, rel=0.02)

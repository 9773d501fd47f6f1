"""The GPU configs ask for enough GPUs: each stage's weights (counted on the meta device from the model's published
dims, with the loader's own per-stage selection) plus the decoder's KV budget fit the GPUs its replica holds."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import MllamaConfig, MllamaForConditionalGeneration

from pipeline.model.weights import wanted

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
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
    with torch.device("meta"):
        return {n: p.numel() for n, p in MllamaForConditionalGeneration(config).named_parameters()}


def stage_bytes(config: MllamaConfig, counts: dict[str, int], parts: tuple[str, ...], itemsize: int) -> int:
    need = wanted(config, parts)
    return sum(c for n, c in counts.items() if need(n)) * itemsize


@pytest.mark.parametrize("name", sorted(TEXT))
def test_weights_plus_kv_fit_the_gpus_each_stage_asks_for(name):
    app = yaml.safe_load((CONFIGS / name).read_text())["applications"][0]
    args, deployments = app["args"], {d["name"]: d for d in app["deployments"]}
    itemsize = getattr(torch, args["model"]["dtype"]).itemsize
    config = MllamaConfig(vision_config=VISION, text_config=TEXT[name], image_token_index=128256)
    counts = param_counts(config)
    for stage, parts in STAGES.items():
        gpus = deployments[stage]["ray_actor_options"]["num_gpus"]
        weights = stage_bytes(config, counts, parts, itemsize)
        kv = args["engine"]["kv_budget_bytes"] if stage == "DecoderPool" else 0
        print(f"{name} {stage}: {weights / 1e9:.1f} GB weights + {kv / 1e9:.1f} GB KV on {gpus} x 80 GB")
        assert weights + kv <= gpus * GPU_BYTES * 0.95, f"{stage} needs {(weights + kv) / 1e9:.1f} GB"
    # The published sizes: ~10.7 B parameters for the 11B, ~88.8 B for the 90B (lm_head counted in the decoder).
    expected = {"llama-3.2-11b-vision.yaml": 10.6e9, "llama-3.2-90b-vision.yaml": 88.6e9}[name]
    decoder_and_vision = stage_bytes(config, counts, ("vision", "text"), 1)
    assert decoder_and_vision == pytest.approx(expected, rel=0.02)

"""In-memory model presets (`preset:NAME` sources): the weight init the bundled checkpoint uses, and the bench model, big enough that a
CPU decode step is real matmul and KV work, shaped so one image's cross-attention K/V outweighs a
1,000-token prompt's self-attention K/V (in the 11B model one image equals ~1,600 text tokens)."""

import math

import torch
from transformers import (
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
)

from pipeline.config import ModelConfig
from pipeline.errors import ModelSourceError
from pipeline.model.loaded import LoadedModel, pick_device_dtype, prepare_for_inference
from pipeline.model.sources import ASSETS

BENCH_TEXT = dict(
    hidden_size=1024, num_attention_heads=8, num_key_value_heads=4, intermediate_size=2816,
    num_hidden_layers=12, cross_attention_layers=[2, 5, 8, 11], max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
BENCH_VISION = dict(
    hidden_size=64, attention_heads=2, intermediate_size=128, num_hidden_layers=1, num_global_layers=1,
    intermediate_layers_indices=[0], vision_output_dim=128, image_size=448, patch_size=14, max_num_tiles=4,
)


@torch.no_grad()
def init_weights(model: MllamaForConditionalGeneration, seed: int = 0) -> None:
    """Scale weights near 1/sqrt(fan_in) so activations neither vanish nor saturate, and open the gates.

    HF's default init (std 0.02, cross-attention gates 0) makes a model that ignores its image and
    repeats one token; exactness tests on such a model prove nothing.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("_gate"):
            p.fill_(1.0)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        elif p.dim() >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            if "embed" in name:
                p.mul_(math.sqrt(fan_in))
        elif name.endswith("bias"):
            p.zero_()


def build_bench_model(cfg: ModelConfig | None = None, seed: int = 0) -> LoadedModel:
    """The bench preset with the tiny checkpoint's tokenizer and chat template; random weights, no files."""
    cfg = cfg or ModelConfig(source="preset:bench")
    tiny = MllamaProcessor.from_pretrained(ASSETS / "tiny-mllama")
    tok = tiny.tokenizer
    text = dict(BENCH_TEXT, vocab_size=tok.convert_tokens_to_ids("<|image|>"), bos_token_id=tok.bos_token_id,
                pad_token_id=tok.pad_token_id, eos_token_id=[tok.convert_tokens_to_ids(t) for t in
                                                             ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")])
    config = MllamaConfig(vision_config=BENCH_VISION, text_config=text, image_token_index=text["vocab_size"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval().requires_grad_(False)
    init_weights(model, seed)
    model.generation_config.eos_token_id = text["eos_token_id"]
    model.generation_config.pad_token_id = text["pad_token_id"]
    device, dtype = pick_device_dtype(cfg)
    model = prepare_for_inference(model.to(device=device, dtype=dtype))
    size = BENCH_VISION["image_size"]
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessorPil(size={"height": size, "width": size}, max_image_tiles=4),
        tokenizer=tok, chat_template=tiny.chat_template,
    )
    return LoadedModel(model=model, path=None, device=device, dtype=dtype, cfg=cfg,
                       preset_processor=processor)


PRESETS = {"bench": build_bench_model}  # preset:NAME -> builder(ModelConfig) -> LoadedModel


def build_preset(cfg: ModelConfig) -> LoadedModel:
    name = cfg.source.removeprefix("preset:")
    if name not in PRESETS:
        raise ModelSourceError(f"no preset {cfg.source!r} (have: {', '.join('preset:' + p for p in PRESETS)})")
    return PRESETS[name](cfg)

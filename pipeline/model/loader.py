"""Load a stage's share of a checkpoint (from any model source) and its processor."""

import torch
from transformers import AutoProcessor, MllamaForConditionalGeneration
from transformers.utils import logging as hf_logging

from pipeline.config import ModelConfig
from pipeline.model.loaded import LoadedModel, pick_device_dtype, prepare_for_inference
from pipeline.model.sources import is_preset, resolve_source


def load_model(cfg: ModelConfig | None = None, parts: tuple[str, ...] = ("vision", "text")) -> LoadedModel:
    """Load the checkpoint; `parts` drops what a stage never runs (the encoder needs no text layers, the
    decoder no vision tower) before moving to the device, so each replica holds only its share."""
    cfg = cfg or ModelConfig()
    if is_preset(cfg.source):  # random weights built in memory, for benchmarks
        from pipeline.model.presets import (
            build_preset,  # torch-heavy presets load only when asked for
        )

        return build_preset(cfg)
    path = resolve_source(cfg.source, cfg.cache_dir)
    device, dtype = pick_device_dtype(cfg)
    processor = AutoProcessor.from_pretrained(path)
    hf_logging.disable_progress_bar()
    model = MllamaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    if "vision" not in parts:
        model.model.vision_model = None
        model.model.multi_modal_projector = None
    if "text" not in parts:
        model.model.language_model.layers = torch.nn.ModuleList()
        model.lm_head = None
    model = prepare_for_inference(model.to(device))
    return LoadedModel(model=model, processor=processor, path=path, device=device, dtype=dtype, cfg=cfg)


def load_processor(cfg: ModelConfig):
    """The checkpoint's processor without its weights (the ingress never runs the model)."""
    if is_preset(cfg.source):  # built in memory: its processor comes with the model
        return load_model(cfg, parts=()).processor
    return AutoProcessor.from_pretrained(resolve_source(cfg.source, cfg.cache_dir, weights=False))

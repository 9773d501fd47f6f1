"""Load a stage's share of a checkpoint (from any model source) and its processor."""

import logging
import time

from transformers import AutoProcessor, GenerationConfig, MllamaConfig

from pipeline.config import ModelConfig
from pipeline.memory import return_large_frees_to_os
from pipeline.model.loaded import LoadedModel, pick_device_dtype, prepare_for_inference
from pipeline.model.placement import pick_devices, placement_of
from pipeline.model.sources import is_preset, resolve_source
from pipeline.model.weights import held_layers, load_stage_weights, meta_model

log = logging.getLogger(__name__)
PARTS = ("vision", "trim", "text")


def load_model(cfg: ModelConfig | None = None, parts: tuple[str, ...] = ("vision", "text")) -> LoadedModel:
    """Load only the tensors `parts` run ("vision": tower and projector; "trim": embeddings, the layers through the
    first cross-attention layer and the later cross-attention layers' K/V projections; "text": the text model and
    lm_head), straight from the safetensors into the device and dtype; the rest of
    the model stays on the meta device and holds no memory."""
    cfg = cfg or ModelConfig()
    if unknown := set(parts) - set(PARTS):
        raise ValueError(f"unknown model parts {sorted(unknown)} (have: {PARTS})")
    return_large_frees_to_os()  # every process that runs a stage loads it here: CLI, Serve replicas, batch actors
    if is_preset(cfg.source):  # random weights built in memory, for benchmarks
        # torch-heavy presets load only when asked for
        from pipeline.model.presets import build_preset

        return build_preset(cfg)
    t0 = time.perf_counter()
    path = resolve_source(cfg.source, cfg.cache_dir)
    device, dtype = pick_device_dtype(cfg)
    devices = pick_devices(cfg, device)
    config = MllamaConfig.from_pretrained(path)
    config._attn_implementation = "sdpa"
    model = meta_model(config)
    # balance the layers this stage holds
    held = held_layers(config, parts, model.state_dict()) if len(devices) > 1 else None
    placement, index = placement_of(config.text_config.num_hidden_layers, len(devices), held)
    model, nbytes = load_stage_weights(path, model, parts, dtype, lambda name: devices[index(name)])
    if (path / "generation_config.json").exists():  # EOS ids as from_pretrained reads them
        model.generation_config = GenerationConfig.from_pretrained(path)
    model = prepare_for_inference(model)
    load_s = time.perf_counter() - t0
    log.info("loaded %s of %s: %.1f MiB in %.1f s (%s, %s)", "+".join(parts), path, nbytes / 2**20, load_s,
             dtype, ", ".join(map(str, devices)))
    return LoadedModel(model=model, path=path, device=devices[0], dtype=dtype, cfg=cfg,
                       loaded_bytes=nbytes, load_s=load_s, devices=devices, placement=placement)


def load_processor(cfg: ModelConfig):
    """The checkpoint's processor without its weights (the ingress never runs the model)."""
    if is_preset(cfg.source):  # built in memory: its processor comes with the model
        return load_model(cfg, parts=()).processor
    return AutoProcessor.from_pretrained(resolve_source(cfg.source, cfg.cache_dir, weights=False))

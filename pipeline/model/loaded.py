"""LoadedModel: a stage's weights and processor plus the layout facts every stage reads; device and dtype choice."""

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoProcessor, MllamaForConditionalGeneration

from pipeline.config import ModelConfig
from pipeline.model.blind_rows import zero_blind_rows


def pick_device_dtype(cfg: ModelConfig) -> tuple[torch.device, torch.dtype]:
    """The first (or only) device and the dtype; with a device list, its first entry."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.devices[0] if isinstance(cfg.devices, list) and cfg.devices else device)
    if cfg.dtype != "auto":
        dtype = getattr(torch, cfg.dtype)
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prepare_for_inference(model: MllamaForConditionalGeneration) -> MllamaForConditionalGeneration:
    """eval, no grads, cross-attention never causal (HF's SDPA path treats a maskless multi-row query as causal,
    which truncates cross-attention K/V), and rows that see no image get no cross-attention output (Meta's
    reference; blind_rows.py), so HF's own generate on a loaded model is the reference the stages must match."""
    model = model.eval().requires_grad_(False)
    zero_blind_rows(model)
    layers = model.model.language_model.layers
    for idx in model.config.text_config.cross_attention_layers:
        layers[idx].cross_attn.is_causal = False
    return model


@dataclass
class LoadedModel:
    """Processor and weights, plus the layout facts every stage needs."""

    model: MllamaForConditionalGeneration
    path: Path | None  # None for a preset built in memory
    device: torch.device
    dtype: torch.dtype
    cfg: ModelConfig
    loaded_bytes: int = 0  # the weights this stage read from the checkpoint
    load_s: float = 0.0
    devices: list[torch.device] = field(default_factory=list)  # the placement's devices; [device] when one
    placement: list[int] = field(default_factory=list)  # text layer i lives on devices[placement[i]]
    preset_processor: object | None = None  # a preset's, built with it

    @cached_property
    def processor(self):
        """Read on first use: Llama-3.2's tokenizer holds ~0.2 GiB, and the encoder and trimmer never use it."""
        return self.preset_processor or AutoProcessor.from_pretrained(self.path)

    def __post_init__(self):
        self.devices = self.devices or [self.device]
        self.placement = self.placement or [0] * self.text_config.num_hidden_layers

    def load_stats(self) -> dict:
        """What this stage loaded and the process's peak resident memory (VmHWM; Linux, else ru_maxrss)."""
        return {"loaded_bytes": self.loaded_bytes, "load_s": round(self.load_s, 3), "peak_rss_bytes": peak_rss()}

    @property
    def text(self):
        return self.model.model.language_model

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def cross_layers(self) -> list[int]:
        return list(self.text_config.cross_attention_layers)

    @property
    def first_cross(self) -> int:
        return self.cross_layers[0]

    @property
    def cache_id(self) -> str:
        """What prefix caches key this model's K/V by (pipeline/prefix_hash.py): its weights and dtype."""
        return f"{self.cfg.source}|{self.dtype}"

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

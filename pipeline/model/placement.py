"""Layer placement over several devices: a stage whose weights exceed one GPU splits its text layers over the GPUs
its actor holds (embeddings and vision tower on the first, final norm and lm_head on the last); on CPU the same
path runs over a list such as ["cpu", "cpu"]."""

import re

import torch

from pipeline.config import ModelConfig


def pick_devices(cfg: ModelConfig, device: torch.device) -> list[torch.device]:
    """None: everything on `device`; "auto": every GPU this process sees (Ray sets CUDA_VISIBLE_DEVICES to the
    actor's num_gpus), one device when there are fewer than two; a list: those devices, in order."""
    if cfg.devices is None or (cfg.devices == "auto" and device.type != "cuda"):
        return [device]
    if cfg.devices == "auto":
        n = torch.cuda.device_count()
        return [torch.device(f"cuda:{i}") for i in range(n)] if n > 1 else [device]
    return [torch.device(d) for d in cfg.devices]


def split_layers(num_layers: int, parts: int, held: list[bool] | None = None) -> list[int]:
    """Contiguous and balanced over the layers the stage holds weights of (default all): the k-th of m held layers
    -> part k * parts // m (part sizes differ by at most one); a layer it holds nothing of (never run) goes with
    the next held one."""
    held = held if held and any(held) else [True] * num_layers
    m, k, out = sum(held), 0, []
    for h in held:
        out.append(min(k, m - 1) * parts // m)
        k += h
    return out


def layer_of(name: str) -> int | None:
    """The text layer a (renamed) parameter name belongs to, or None outside the text layers."""
    m = re.match(r"model\.language_model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def placement_of(num_layers: int, parts: int, held: list[bool] | None = None):
    """(layer -> device index, name -> device index) for a model's parameter names."""
    layers = split_layers(num_layers, parts, held)

    def index(name: str) -> int:
        if (layer := layer_of(name)) is not None:
            return layers[layer]
        if name.startswith(("model.language_model.norm.", "lm_head.")):
            return parts - 1
        return 0  # embeddings, rotary table, vision tower, projector
    return layers, index


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a loaded layer's weights live (its first non-meta parameter)."""
    return next(p.device for p in module.parameters() if not p.is_meta)


def moved(tensors: tuple, device: torch.device, cache: dict) -> tuple:
    """`tensors` on `device`, copied once per device (rotary cos/sin, masks) and kept in `cache`."""
    if device not in cache:
        cache[device] = tuple(t.to(device) for t in tensors)
    return cache[device]

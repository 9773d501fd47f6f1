"""Per-stage loading: build the model on the meta device and read only the tensors a stage runs from the (sharded)
safetensors, one tensor at a time straight into its dtype and device; keys renamed by transformers' own mapping."""

import json
import struct
from pathlib import Path

import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    rename_source_key,
)

from pipeline.errors import ModelSourceError
from pipeline.model.placement import layer_of

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
VISION = ("model.vision_model.", "model.multi_modal_projector.")
TEXT = ("model.language_model.",)


def wanted(config: MllamaConfig, parts: tuple[str, ...]):
    """A predicate on (renamed) parameter names: does a stage running `parts` need this tensor?

    vision: the tower and projector. text: the whole text model and lm_head (the decoder). trim: the embeddings,
    every layer up to and including the first cross-attention layer (which it runs), and of every later
    cross-attention layer only the K/V projections and k_norm (it projects the kept tokens' K/V there)."""
    cross = config.text_config.cross_attention_layers
    first = cross[0]
    kv_only = ("cross_attn.k_proj.", "cross_attn.v_proj.", "cross_attn.k_norm.")

    def trim(name: str) -> bool:
        if name.startswith("model.language_model.embed_tokens."):
            return True
        layer = layer_of(name)
        if layer is None:
            return False
        rest = name.split(".", 4)[4]  # after model.language_model.layers.N.
        return layer <= first or (layer in cross and rest.startswith(kv_only))

    def need(name: str) -> bool:
        if "vision" in parts and name.startswith(VISION):
            return True
        if "text" in parts and (name.startswith(TEXT) or name.startswith("lm_head.")):
            return True
        return "trim" in parts and trim(name)
    return need


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"no safetensors weights in {path}")
    return files


def read_header(file: Path) -> tuple[dict, int]:
    """The safetensors header {name: {dtype, shape, data_offsets}} and where the data starts."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensor(f, start: int, info: dict, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One tensor read with plain file reads (no mmap: the page cache is not charged to this process)."""
    begin, end = info["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(start + begin)
    f.readinto(memoryview(buf.numpy()))
    t = buf.view(DTYPES[info["dtype"]]).reshape(info["shape"])
    if t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)  # one tensor at a time: the transient copy is one tensor's size
    return t.to(device)


def _set(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def meta_model(config: MllamaConfig) -> MllamaForConditionalGeneration:
    """The model's modules with no memory behind them: names and shapes only."""
    with torch.device("meta"):
        return MllamaForConditionalGeneration(config)


def load_stage_weights(path: Path, model: MllamaForConditionalGeneration, parts: tuple[str, ...],
                       dtype: torch.dtype, device_of) -> tuple[MllamaForConditionalGeneration, int]:
    """`model` (from meta_model) with the tensors `parts` need loaded in place (device_of(name) places each) and
    everything else left on the meta device (it holds no memory). Returns (model, bytes loaded)."""
    config = model.config
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    state = model.state_dict()  # meta tensors: names only
    need = wanted(config, parts)
    todo = {n for n in state if need(n)}
    loaded = 0
    for file in shard_files(path):
        header, start = read_header(file)
        with open(file, "rb") as f:
            for key, info in header.items():
                name, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
                if name not in todo:
                    continue
                t = read_tensor(f, start, info, dtype, device_of(name))
                if tuple(t.shape) != tuple(state[name].shape):
                    raise ModelSourceError(f"{file.name}: {key} has shape {tuple(t.shape)}, the config says "
                                           f"{tuple(state[name].shape)}")
                _set(model, name, t)
                todo.discard(name)
                loaded += t.numel() * t.element_size()
    if todo:
        raise ModelSourceError(f"{path}: {len(todo)} weights missing from the checkpoint, e.g. {sorted(todo)[:3]}")
    if any(p in parts for p in ("text", "trim")):  # the rotary table is computed, not stored
        text = model.model.language_model
        with torch.device("cpu"):
            rotary = type(text.rotary_emb)(config.text_config)
        text.rotary_emb = rotary.to(device_of("model.language_model.rotary_emb.inv_freq"))
    return model, loaded


def held_layers(config: MllamaConfig, parts: tuple[str, ...], names) -> list[bool]:
    """Which text layers a stage running `parts` loads any weights of, from the model's parameter names."""
    need, held = wanted(config, parts), [False] * config.text_config.num_hidden_layers
    for name in names:
        if need(name) and (layer := layer_of(name)) is not None:
            held[layer] = True
    return held

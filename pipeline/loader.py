"""Resolve a model source (local dir, s3://, hub id, bundled:NAME) and load processor and weights."""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoProcessor, MllamaForConditionalGeneration
from transformers.utils import logging as hf_logging

from .config import ModelConfig
from .errors import ModelSourceError

ASSETS = Path(__file__).resolve().parent / "assets"


def resolve_source(source: str, cache_dir: str | None = None) -> Path:
    """Return a local directory holding the checkpoint named by `source`."""
    if source.startswith("bundled:"):
        path = ASSETS / source.removeprefix("bundled:")
        if not path.is_dir():
            raise ModelSourceError(f"no bundled model {source!r} (have: {sorted(p.name for p in ASSETS.iterdir())})")
        return path
    if source.startswith("s3://"):
        return download_s3(source, Path(cache_dir or Path.home() / ".cache" / "crosstrim"))
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith("."):
        return download_hub(source, cache_dir)  # looks like a hub id: owner/name
    raise ModelSourceError(f"model directory {source!r} does not exist")


def download_s3(uri: str, cache_root: Path) -> Path:
    """Mirror s3://bucket/prefix into the cache (skipping files already there at the same size)."""
    import boto3  # imported here: only s3 sources need it

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/")
    dest = cache_root / "s3" / bucket / prefix
    # boto3 reads AWS_ENDPOINT_URL, credentials and region from the environment like the AWS CLI.
    s3 = boto3.client("s3")
    found = 0
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :].lstrip("/")
                if not rel or rel.endswith("/"):
                    continue
                target = dest / rel
                found += 1
                if target.exists() and target.stat().st_size == obj["Size"]:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".part")
                s3.download_file(bucket, obj["Key"], str(tmp))
                tmp.replace(target)
    except Exception as exc:  # botocore raises many kinds; the message is what an operator needs
        raise ModelSourceError(f"could not download {uri}: {exc}") from exc
    if not found:
        raise ModelSourceError(f"no objects under {uri}")
    return dest


def download_hub(repo_id: str, cache_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir))
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else " (is this machine offline?)"
        raise ModelSourceError(f"could not fetch {repo_id!r} from the Hugging Face hub{hint}: {exc}") from exc


def pick_device_dtype(cfg: ModelConfig) -> tuple[torch.device, torch.dtype]:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype != "auto":
        dtype = getattr(torch, cfg.dtype)
    else:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return torch.device(device), dtype


@dataclass
class LoadedModel:
    """Processor and weights, plus the layout facts every stage needs."""

    model: MllamaForConditionalGeneration
    processor: object
    path: Path
    device: torch.device
    dtype: torch.dtype
    cfg: ModelConfig

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
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer."""
        tc = self.text_config
        head_dim = tc.hidden_size // tc.num_attention_heads
        return 2 * tc.num_key_value_heads * head_dim * self.dtype.itemsize


def load_model(cfg: ModelConfig | None = None, parts: tuple[str, ...] = ("vision", "text")) -> LoadedModel:
    """Load the checkpoint; `parts` drops what a stage never runs (the encoder needs no text layers, the
    decoder no vision tower) before moving to the device, so each replica holds only its share."""
    cfg = cfg or ModelConfig()
    if cfg.source == "preset:bench":  # random weights built in memory, for benchmarks
        from .bench_model import build_bench_model

        return build_bench_model(cfg)
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
    model = model.to(device).eval().requires_grad_(False)
    for layer_idx in model.config.text_config.cross_attention_layers if "text" in parts else []:
        # HF's SDPA path treats a maskless multi-row query as causal, which truncates cross-attention K/V.
        model.model.language_model.layers[layer_idx].cross_attn.is_causal = False
    return LoadedModel(model=model, processor=processor, path=path, device=device, dtype=dtype, cfg=cfg)

"""Model sources, one registry keyed by scheme: `bundled:NAME`, `preset:NAME` (built in memory), `s3://bucket/prefix`
(mirrored into the cache), a local directory, or a hub id (owner/name)."""

import os
import re
from pathlib import Path

from pipeline.errors import ModelSourceError
from pipeline.storage import WEIGHT_SUFFIXES, mirror_s3

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def is_preset(source: str) -> bool:
    """`preset:NAME` models are built in memory (pipeline.model.presets); they have no files to resolve."""
    return source.startswith("preset:")


def _bundled(source: str, cache_dir: str | None, weights: bool) -> Path:
    path = ASSETS / source.removeprefix("bundled:")
    if not path.is_dir():
        raise ModelSourceError(f"no bundled model {source!r} (have: {sorted(p.name for p in ASSETS.iterdir())})")
    return path


def _s3(source: str, cache_dir: str | None, weights: bool) -> Path:
    return mirror_s3(source, cache_dir, skip_suffixes=() if weights else WEIGHT_SUFFIXES)


def _preset(source: str, cache_dir: str | None, weights: bool) -> Path:
    raise ModelSourceError(f"{source!r} is built in memory and has no files; load it with load_model")


SCHEMES = {"bundled:": _bundled, "preset:": _preset, "s3://": _s3}


def resolve_source(source: str, cache_dir: str | None = None, weights: bool = True) -> Path:
    """A local directory holding the checkpoint named by `source`; weights=False may leave the weights out
    (the ingress needs only the processor's files)."""
    for prefix, resolve in SCHEMES.items():
        if source.startswith(prefix):
            return resolve(source, cache_dir, weights)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith("."):
        return download_hub(source, cache_dir, weights)  # looks like a hub id: owner/name
    raise ModelSourceError(f"model directory {source!r} does not exist")


def download_hub(repo_id: str, cache_dir: str | None, weights: bool = True) -> Path:
    from huggingface_hub import snapshot_download

    ignore = None if weights else [f"*{s}" for s in WEIGHT_SUFFIXES]
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, ignore_patterns=ignore))
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else " (is this machine offline?)"
        raise ModelSourceError(f"could not fetch {repo_id!r} from the Hugging Face hub{hint}: {exc}") from exc

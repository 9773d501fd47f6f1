"""Rows that see no image (the chat template's text before the first image token) get no cross-attention output,
as in Meta's reference; transformers 5.24 adds an unmasked average over every visual token, padding tiles'
included. crosstrim's class swap, its stages and its trimming reference follow Meta."""

import pytest
import torch
from transformers import MllamaForConditionalGeneration

from pipeline.config import TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.model.blind_rows import BlindRowsZeroedLayer, zero_blind_rows
from pipeline.model.sources import ASSETS
from pipeline.quality.reference import reference_generate
from tests.helpers import PROMPTS, hf_blind_rows, meta_reference, reference_blind_rows, reference_vision_tap

FIXED_MESSAGE = ("transformers' MllamaCrossAttentionDecoderLayer now zeroes the attention branch of rows that see "
                 "no image: pipeline/model/blind_rows.py and tests/helpers.reference_blind_rows can go")


def _fresh() -> MllamaForConditionalGeneration:
    """HF's model as from_pretrained gives it; the tiny random checkpoint (gates open, so the rows' cross-attention
    output reaches the logits)."""
    return MllamaForConditionalGeneration.from_pretrained(ASSETS / "tiny-mllama", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prepared(tiny_pipeline, imgs):
    """A 1-tile image (3 padding tiles) after a blind prefix."""
    out = tiny_pipeline.prepare(PROMPTS[1], [imgs["1tile"]])
    blind = int((out.cross_attention_mask.sum(dim=(1, 2)) == 0).sum())
    assert blind > 0, "the chat template puts rows before the image token"
    return out


@torch.inference_mode()
def _logits(model, prepared) -> torch.Tensor:
    return model(**prepared.hf_inputs()).logits[0].float()  # (S, V): every row


def test_hf_departs_from_meta_for_blind_rows(prepared):
    """The oracle's change is real: every row's logits move (later rows read the blind rows' self-attention K/V)."""
    model = _fresh()
    stock = _logits(model, prepared)
    with reference_blind_rows(model):
        reference = _logits(model, prepared)
    assert (stock - reference).abs().max() > 1e-3, FIXED_MESSAGE
    assert (stock[-1] - reference[-1]).abs().max() > 1e-4, FIXED_MESSAGE


def test_the_class_swap_is_the_independent_implementation(prepared):
    """zero_blind_rows (what every load applies) equals tests' own implementation, and changes nothing else:
    HF's own forward on a swapped model is stock HF."""
    stock_model, swapped = _fresh(), _fresh()
    zero_blind_rows(swapped)
    zero_blind_rows(swapped)  # idempotent
    layers = swapped.model.language_model.layers
    assert sum(isinstance(la, BlindRowsZeroedLayer) for la in layers) == len(swapped.config.text_config.cross_attention_layers)
    with reference_blind_rows(stock_model):
        reference = _logits(stock_model, prepared)
    assert torch.allclose(_logits(swapped, prepared), reference, atol=1e-6, rtol=0)
    with hf_blind_rows(swapped):
        assert torch.allclose(_logits(swapped, prepared), _logits(stock_model, prepared), atol=1e-6, rtol=0)


@pytest.mark.parametrize("ship", ["kv", "features"])
def test_stages_follow_meta_for_blind_rows(tiny_pipeline, prepared, ship):
    """Untrimmed first-step logits within 1e-4 of the oracle's and not of HF's own blind rows; trimmed tokens are
    the trimming reference's under the oracle."""
    model = tiny_pipeline.loaded.model
    engine = LLMEngine(tiny_pipeline.loaded)
    ours = engine.prefill_logits(tiny_pipeline.trim(prepared, TrimConfig(policy="none"), ship=ship)).float()
    with meta_reference(model):
        reference = _logits(model, prepared)[-1]
    with reference_vision_tap(model), hf_blind_rows(model):  # the reference tap, HF's blind rows
        hf_rows = _logits(model, prepared)[-1]
    assert (ours - reference).abs().max() <= 1e-4
    assert (ours - hf_rows).abs().max() > 1e-4, FIXED_MESSAGE
    cfg = TrimConfig(k_ratio=0.2)
    with meta_reference(model):
        want = reference_generate(model, prepared, cfg, 12)
    (seq,) = engine.generate([tiny_pipeline.trim(prepared, cfg, ship=ship)], SamplingParams(max_tokens=12))
    assert seq.output_ids == want

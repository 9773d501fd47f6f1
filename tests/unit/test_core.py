"""The encode / trim / decode split is exact: untrimmed equals HF generate, trimmed equals the reference."""

import io
import json
import math
import subprocess

import pytest
import torch

from pipeline.cli import main as cli_main
from pipeline.config import TrimConfig
from pipeline.engine.sampling import SamplingParams
from pipeline.quality.reference import (
    reference_generate,
    reference_select,
    trim_generated,
)
from pipeline.types import CrossKV, DecodeRequest, KeptFeatures
from tests.helpers import PROMPTS, meta_reference

MAX_NEW = 12
CASES = [
    ("1tile", PROMPTS[0], ["1tile"]),
    ("4tile", PROMPTS[1], ["4tile"]),
    ("2tile", PROMPTS[2], ["2tile"]),
    ("4tile-other-prompt", PROMPTS[3], ["4tile"]),
    ("two-images", PROMPTS[1], ["1tile", "4tile"]),
    ("text-only", PROMPTS[0], []),
]


def _hf_tokens(model, prepared):
    """HF generate with the oracle's corrections (never active while the pipeline, which shares `model`, runs)."""
    with meta_reference(model):
        out = model.generate(**prepared.hf_inputs(), max_new_tokens=MAX_NEW, do_sample=False)
    return trim_generated(out[0, prepared.input_ids.numel() :].tolist(), model)


def _first_logits(pipe, request):
    """Our first-step logits: the decoder's prefill of one sequence."""
    return pipe.engine.prefill_logits(request)


@pytest.mark.parametrize("name,prompt,image_names", CASES, ids=[c[0] for c in CASES])
def test_untrimmed_equals_hf_generate(tiny_pipeline, imgs, name, prompt, image_names):
    pipe, model = tiny_pipeline, tiny_pipeline.loaded.model
    images = [imgs[n] for n in image_names]
    prepared = pipe.prepare(prompt, images)
    ours = pipe.generate(prompt, images, SamplingParams(max_tokens=MAX_NEW), TrimConfig(policy="none"))
    assert ours.token_ids == _hf_tokens(model, prepared)
    assert ours.kept_tokens == ours.visual_tokens
    with torch.no_grad(), meta_reference(model):
        hf_logits = model(**prepared.hf_inputs()).logits[0, -1]
    ours_logits = _first_logits(pipe, pipe.trim(prepared, TrimConfig(policy="none")))
    assert torch.allclose(ours_logits, hf_logits, atol=1e-4, rtol=0)


def test_model_is_not_degenerate(tiny_pipeline, imgs):
    """Exactness on a model that ignores its input or repeats one token would prove nothing."""
    outs = {(p, n): tuple(tiny_pipeline.generate(p, [imgs[n]], SamplingParams(max_tokens=8)).token_ids)
            for p in PROMPTS[:2] for n in ("1tile", "4tile")}
    assert len(set(outs.values())) == len(outs), "different images and prompts must give different outputs"
    assert all(len(set(o)) > 1 for o in outs.values())


@pytest.mark.parametrize("cfg", [TrimConfig(k_ratio=r) for r in (0.05, 0.15, 0.4)]
                         + [TrimConfig(policy="budget", budget_tokens=40), TrimConfig(policy="mass", mass=0.5)],
                         ids=["k0.05", "k0.15", "k0.4", "budget40", "mass0.5"])
@pytest.mark.parametrize("image_names", [["1tile"], ["4tile"], ["2tile", "4tile"]], ids=["1tile", "4tile", "two"])
def test_trimmed_equals_reference(tiny_pipeline, imgs, cfg, image_names):
    pipe, model = tiny_pipeline, tiny_pipeline.loaded.model
    images = [imgs[n] for n in image_names]
    prepared = pipe.prepare(PROMPTS[1], images)
    ours = pipe.generate(PROMPTS[1], images, SamplingParams(max_tokens=MAX_NEW), cfg)
    assert ours.kept_tokens < ours.visual_tokens or cfg.k_ratio == 1
    with meta_reference(model):
        assert ours.token_ids == reference_generate(model, prepared, cfg, MAX_NEW)
    # The same tokens are kept as the reference selects on HF's own forward.
    trim = pipe.trim(prepared, cfg)
    with meta_reference(model):
        keep = reference_select(model, prepared, cfg)
    ours_kept = set((trim.image.kept_image * (keep.numel() // len(images)) + trim.image.kept_index).tolist())
    assert ours_kept == set(keep.nonzero().squeeze(1).tolist())


def test_trimming_changes_the_output(tiny_pipeline, imgs):
    """The cross-attention gates are open: dropping most visual tokens must matter."""
    full = tiny_pipeline.generate(PROMPTS[1], [imgs["4tile"]], SamplingParams(max_tokens=MAX_NEW), TrimConfig(policy="none"))
    cut = tiny_pipeline.generate(PROMPTS[1], [imgs["4tile"]], SamplingParams(max_tokens=MAX_NEW), TrimConfig(k_ratio=0.02))
    assert full.token_ids != cut.token_ids


def test_features_mode_equals_kv_mode(tiny_pipeline, imgs):
    pipe = tiny_pipeline
    prepared = pipe.prepare(PROMPTS[0], [imgs["4tile"]])
    visual = pipe.encoder.encode(prepared)
    kv, features = (pipe.trimmer.trim(prepared, visual, ship=ship) for ship in ("kv", "features"))
    assert isinstance(kv.resume.cross, CrossKV) and isinstance(features.resume.cross, KeptFeatures)
    assert torch.equal(kv.image.kept_index, features.image.kept_index)
    (a,) = pipe.engine.generate([kv], SamplingParams(max_tokens=MAX_NEW))
    (b,) = pipe.engine.generate([features], SamplingParams(max_tokens=MAX_NEW))
    assert a.output_ids == b.output_ids
    assert features.nbytes < kv.nbytes
    assert features.image.cross_kv_bytes == kv.image.cross_kv_bytes


def test_decode_request_payload_round_trip(tiny_pipeline, imgs):
    """Tensors plus plain fields (what the Serve hop and the batch rows carry) give back the same request."""
    pipe = tiny_pipeline
    prepared = pipe.prepare(PROMPTS[0], [imgs["1tile"]])
    visual = pipe.encoder.encode(prepared)
    for request in [pipe.trim(pipe.prepare(PROMPTS[0], []))] + [
            pipe.trimmer.trim(prepared, visual, ship=ship) for ship in ("kv", "features")]:
        payload = request.to_payload()
        assert all(isinstance(t, torch.Tensor) for t in payload.tensors.values())
        back = DecodeRequest.from_payload(payload)
        assert back.to_payload().fields == payload.fields and back.nbytes == request.nbytes
        assert type(back.resume and back.resume.cross) is type(request.resume and request.resume.cross)
        (a, b) = pipe.engine.generate([request, back], SamplingParams(max_tokens=6))
        assert a.output_ids == b.output_ids


# --- selection properties ---------------------------------------------------------------------------------

def test_lightened_vision_tower_changes_no_number(tiny_pipeline, imgs):
    """The tapped encoders drop HF's per-layer states nobody reads and the MLPs run in row chunks; the features
    equal the reference tap's (tests' own loop) over HF's own classes on the same modules."""
    from transformers.models.mllama.modeling_mllama import (
        MllamaVisionEncoder,
        MllamaVisionMLP,
    )

    from pipeline.model.encoder import RowChunkedVisionMLP, TappedVisionEncoder

    pipe = tiny_pipeline
    vision = pipe.loaded.model.model.vision_model
    encoders = (vision.transformer, vision.global_transformer)
    mlps = [layer.mlp for e in encoders for layer in e.layers]
    assert all(type(e) is TappedVisionEncoder for e in encoders)
    assert all(type(m) is RowChunkedVisionMLP for m in mlps)
    x = torch.randn(1, 24, vision.config.hidden_size)
    states = vision.transformer(x).hidden_states
    taps = set(vision.intermediate_layers_indices)
    assert [i for i, h in enumerate(states) if h is not None] == sorted(taps)
    assert all(h is None for h in vision.global_transformer(x).hidden_states)
    prepared = pipe.prepare(PROMPTS[1], [imgs["4tile"]])
    rows = RowChunkedVisionMLP.ROWS
    try:
        RowChunkedVisionMLP.ROWS = 7  # the tiny tower's 4 x 72 rows in many chunks, a short last one
        ours = pipe.encoder.encode(prepared).features
        for e in encoders:  # HF's own classes, whole MLPs, on the same modules, every layer's input kept
            e.__class__ = MllamaVisionEncoder
        for m in mlps:
            m.__class__ = MllamaVisionMLP
        with meta_reference(pipe.loaded.model):
            theirs = pipe.encoder.encode(prepared).features
            full = vision.transformer(x).hidden_states
    finally:
        RowChunkedVisionMLP.ROWS = rows
        for e in encoders:
            e.__class__ = TappedVisionEncoder
        for m in mlps:
            m.__class__ = RowChunkedVisionMLP
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert len(full) == len(states) and all(torch.allclose(full[i], states[i], atol=1e-5) for i in taps)


def test_topk_union_is_the_union_of_per_head_topk():
    from pipeline.model.selection import select_topk_union

    scores = torch.rand(6, 50, generator=torch.Generator().manual_seed(0))
    k = 7
    expected = set()
    for head in scores.tolist():
        expected |= set(sorted(range(50), key=lambda i: -head[i])[:k])
    assert set(select_topk_union(scores, k).tolist()) == expected


def test_selection_is_deterministic_with_ties():
    from pipeline.model.selection import select_tokens

    tied = torch.ones(3, 20)
    assert select_tokens(tied, TrimConfig(k_ratio=0.25)).tolist() == [0, 1, 2, 3, 4]
    assert select_tokens(tied, TrimConfig(policy="budget", budget_tokens=3)).tolist() == [0, 1, 2]


def test_topk_count_rounds_up_exactly():
    from pipeline.model.selection import topk_count

    assert topk_count(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004 in floating point
    assert topk_count(0.01, 10) == 1
    assert topk_count(1.0, 260) == 260
    assert topk_count(0.15, 65) == math.ceil(0.15 * 65)


def test_budget_and_mass_policies():
    from pipeline.model.selection import select_budget, select_mass

    scores = torch.tensor([[0.5, 0.3, 0.1, 0.1, 0.0], [0.0, 0.0, 0.2, 0.2, 0.6]])
    assert select_budget(scores, 3).tolist() == [0, 1, 4]  # rank 0 of each head, then head 0's rank 1
    assert select_mass(scores, 0.75).tolist() == [0, 1, 2, 4]  # head 0 needs {0,1}, head 1 {4,2} (tie: 2 first)
    assert select_mass(scores, 0.5).tolist() == [0, 4]


def test_kept_grows_with_k_ratio_and_never_keeps_padding(tiny_pipeline, imgs):
    pipe = tiny_pipeline
    prepared = pipe.prepare(PROMPTS[2], [imgs["1tile"], imgs["2tile"]])
    visual = pipe.encoder.encode(prepared)
    kept_prev = [0, 0]
    for r in (0.01, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0):
        trim = pipe.trimmer.trim(prepared, visual, TrimConfig(k_ratio=r))
        image = trim.image
        assert all(a >= b for a, b in zip(image.kept_tokens, kept_prev))
        kept_prev = image.kept_tokens
        # A padding tile's tokens are never kept.
        assert bool(visual.token_valid[image.kept_image, image.kept_index].all())
    assert kept_prev == trim.image.visual_tokens == [65, 130]
    again = pipe.trimmer.trim(prepared, visual, TrimConfig(k_ratio=0.1))
    first = pipe.trimmer.trim(prepared, visual, TrimConfig(k_ratio=0.1))
    assert torch.equal(again.image.kept_index, first.image.kept_index)
    assert torch.equal(again.resume.cross.kv, first.resume.cross.kv)


def test_cross_kv_bytes_are_kept_tokens_times_per_token_bytes(tiny_pipeline, imgs):
    pipe = tiny_pipeline
    tc = pipe.loaded.text_config
    head_dim = tc.hidden_size // tc.num_attention_heads
    per_token = len(tc.cross_attention_layers) * 2 * tc.num_key_value_heads * head_dim * 4  # fp32
    prepared = pipe.prepare(PROMPTS[0], [imgs["4tile"]])
    trim = pipe.trim(prepared, TrimConfig(k_ratio=0.1))
    image, cross_kv = trim.image, trim.resume.cross.kv
    assert image.cross_kv_bytes == sum(image.kept_tokens) * per_token
    assert image.cross_kv_bytes == cross_kv.numel() * cross_kv.element_size()
    assert image.cross_kv_bytes_full == 260 * per_token
    assert image.cross_kv_bytes / image.cross_kv_bytes_full == pytest.approx(image.kept_fraction, abs=0)


# --- known transformers pitfalls ----------------------------------------------------------------------

def test_sdpa_cross_attention_without_mask_is_not_treated_as_causal(tiny_pipeline):
    """HF's SDPA path treats a maskless multi-row query as causal and truncates K/V to the query length;
    the loader sets is_causal = False on every cross-attention module."""
    text = tiny_pipeline.loaded.text
    for idx in tiny_pipeline.loaded.cross_layers:
        assert text.layers[idx].cross_attn.is_causal is False
    attn = text.layers[tiny_pipeline.loaded.first_cross].cross_attn
    hidden, states = torch.randn(1, 5, 64), torch.randn(1, 30, 64)
    with torch.no_grad():
        unmasked = attn(hidden_states=hidden, cross_attention_states=states)[0]
        masked = attn(hidden_states=hidden, cross_attention_states=states, attention_mask=torch.zeros(1, 1, 5, 30))[0]
        attn.is_causal = True  # what a fresh HF module does: K/V cut to 5 tokens, a different answer
        try:
            causal = attn(hidden_states=hidden, cross_attention_states=states)[0]
        finally:
            attn.is_causal = False
    assert torch.allclose(unmasked, masked, atol=1e-6)
    assert not torch.allclose(causal, masked, atol=1e-3)


def test_hf_oracle_does_not_reappend_cross_states(tiny_pipeline, imgs):
    """Passing precomputed cross_attention_states to generate() re-appends them to the cache every step;
    our oracle passes pixel_values, so each cross layer's cache holds exactly the image's tokens."""
    model = tiny_pipeline.loaded.model
    prepared = tiny_pipeline.prepare(PROMPTS[0], [imgs["1tile"]])
    out = model.generate(**prepared.hf_inputs(), max_new_tokens=4, do_sample=False, min_new_tokens=4,
                         return_dict_in_generate=True)
    cache = out.past_key_values
    for idx in tiny_pipeline.loaded.cross_layers:
        assert cache.layers[idx].keys.shape[-2] == 4 * 65  # one image, 4 tiles of 65 tokens (padding included)


# --- CLI and bad input --------------------------------------------------------------------------------

def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_cli_generate_json(tmp_path, imgs, tiny_pipeline):
    path = tmp_path / "img.png"
    path.write_bytes(_png(imgs["4tile"]))
    run = subprocess.run(
        ["crosstrim", "generate", "--model", "bundled:tiny-mllama", "--image", str(path), "--prompt", PROMPTS[1],
         "--max-tokens", "8", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert {"text", "token_ids", "visual_tokens", "kept_tokens", "cross_kv_bytes", "cross_kv_bytes_full"} <= out.keys()
    expected = tiny_pipeline.generate(PROMPTS[1], [imgs["4tile"]], SamplingParams(max_tokens=8))
    assert out["token_ids"] == expected.token_ids and out["kept_tokens"] == expected.kept_tokens
    assert out["cross_kv_bytes"] / out["cross_kv_bytes_full"] == pytest.approx(out["kept_tokens"] / out["visual_tokens"])


@pytest.mark.parametrize("extra,message", [
    (["--image", "/nonexistent/cat.png"], "does not exist"),
    (["--image", "{notimage}"], "could not be decoded as an image"),
    (["--image", "{img}", "--k-ratio", "0"], "k_ratio"),
    (["--image", "{img}", "--k-ratio", "1.5"], "k_ratio"),
    (["--image", "{img}", "--image", "{img}", "--image", "{img}"], "at most 2"),
])
def test_cli_bad_input_is_a_clear_error(tmp_path, imgs, capsys, extra, message):
    img, notimage = tmp_path / "ok.png", tmp_path / "notimage.png"
    img.write_bytes(_png(imgs["1tile"]))
    notimage.write_bytes(b"this is not an image at all")
    args = [a.format(img=img, notimage=notimage) for a in extra]
    assert cli_main(["generate", "--prompt", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

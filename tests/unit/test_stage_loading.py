"""Per-stage loading reads exactly a stage's tensors, from either key layout, sharded or not; every layout MllamaConfig
accepts runs (first cross-attention layer at 0); the target policy keeps what it promises; long prompts score in chunks."""

import json
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import MllamaForConditionalGeneration, MllamaProcessor

from pipeline.config import ModelConfig, TrimConfig
from pipeline.engine.sampling import SamplingParams
from pipeline.model.loader import load_model
from pipeline.model.selection import ROW_CHUNK, select_budget, select_target, topk_count
from pipeline.model.sources import ASSETS
from pipeline.model.trimmer import Trimmer
from pipeline.model.weights import wanted
from pipeline.quality.reference import reference_generate, trim_generated
from tests.helpers import PROMPTS, meta_reference, script

TINY = ASSETS / "tiny-mllama"
CPU32 = dict(dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def hf_tiny():
    return MllamaForConditionalGeneration.from_pretrained(TINY, dtype=torch.float32).eval()


def _loaded_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.is_meta}


@pytest.mark.parametrize("parts", [("vision",), ("trim",), ("text",), ("vision", "text")])
def test_each_stage_loads_only_its_tensors(hf_tiny, parts):
    loaded = load_model(ModelConfig(source=str(TINY), **CPU32), parts=parts)
    need = wanted(hf_tiny.config, parts)
    reference = dict(hf_tiny.named_parameters())
    expected = {n for n in reference if need(n)}
    assert _loaded_names(loaded.model) == expected
    assert loaded.loaded_bytes == sum(reference[n].numel() * 4 for n in expected)
    for name, p in loaded.model.named_parameters():
        if not p.is_meta:
            assert torch.equal(p, reference[name]), name
    if "vision" not in parts:
        assert not any(n.startswith("model.vision_model.") for n in expected)


def test_trimmer_holds_embeddings_layers_through_the_first_cross_and_later_cross_kv(hf_tiny):
    """The trimmer runs layers[:first + 1] and projects the kept tokens' K/V in every later cross layer: nothing else."""
    text = hf_tiny.config.text_config
    cross, first = text.cross_attention_layers, text.cross_attention_layers[0]
    assert first > 0 and len(cross) > 1  # layers before the first cross layer, and later cross layers
    prefix = "model.language_model."
    layer_names = [f"{prefix}layers.{i}." for i in range(first + 1)]
    kv = [f"{prefix}layers.{i}.cross_attn.{m}." for i in cross[1:] for m in ("k_proj", "v_proj", "k_norm")]
    reference = dict(hf_tiny.named_parameters())
    expected = {n for n in reference if n.startswith((f"{prefix}embed_tokens.", *layer_names, *kv))}
    assert len(expected) == 1 + sum(1 for n in reference for p in layer_names if n.startswith(p)) + len(kv)
    loaded = load_model(ModelConfig(source=str(TINY), **CPU32), parts=("trim",))
    assert _loaded_names(loaded.model) == expected
    assert loaded.loaded_bytes == sum(reference[n].numel() * 4 for n in expected)
    assert loaded.loaded_bytes < 0.5 * sum(p.numel() * 4 for n, p in reference.items() if n.startswith(prefix))
    held = {n for n, p in loaded.model.named_parameters() if not p.is_meta}
    assert all(p.is_meta for n, p in loaded.model.named_parameters() if n not in held)
    assert loaded.model.lm_head.weight.is_meta and loaded.text.norm.weight.is_meta
    assert loaded.text.layers[cross[1]].cross_attn.q_proj.weight.is_meta


def test_new_key_layout_sharded_loads_the_same_tensors(tmp_path, hf_tiny):
    """transformers 5's own names (model.language_model.*), split in two shards with an index."""
    state = {n: t.contiguous() for n, t in hf_tiny.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in TINY.iterdir():
        if not f.name.endswith(".safetensors"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    assert any(k.startswith("model.language_model.") for k in weight_map)
    new = load_model(ModelConfig(source=str(tmp_path), **CPU32))
    assert {n: p for n, p in new.model.named_parameters()}.keys() == dict(hf_tiny.named_parameters()).keys()
    for name, p in hf_tiny.named_parameters():
        assert torch.equal(new.model.get_parameter(name), p), name


def test_missing_weights_are_a_clear_error(tmp_path, hf_tiny):
    from pipeline.errors import ModelSourceError

    state = {n: t.contiguous() for n, t in hf_tiny.state_dict().items() if "layers.3." not in n}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for f in TINY.iterdir():
        if not f.name.endswith(".safetensors"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelSourceError, match="weights missing"):
        load_model(ModelConfig(source=str(tmp_path), **CPU32), parts=("text",))
    load_model(ModelConfig(source=str(tmp_path), **CPU32), parts=("vision",))  # the encoder needs none of them


def test_cross_attention_at_index_0_matches_hf(tmp_path, imgs):
    """A valid layout once crashed the decoder's prefill (an unshaped empty self K/V)."""
    tiny = script("build_tiny_mllama")
    TEXT, build_config = tiny.TEXT, tiny.build_config

    from pipeline.inprocess import Pipeline
    from pipeline.model.presets import init_weights

    processor = MllamaProcessor.from_pretrained(TINY)
    model = MllamaForConditionalGeneration(build_config(processor.tokenizer, text=dict(TEXT, cross_attention_layers=[0, 5, 7])))
    init_weights(model, 0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    hf = MllamaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    pipe = Pipeline(ModelConfig(source=str(tmp_path), **CPU32))
    for name in ("1tile", "4tile"):
        prepared = pipe.prepare(PROMPTS[0], [imgs[name]])
        ours = pipe.generate(PROMPTS[0], [imgs[name]], SamplingParams(max_tokens=8), TrimConfig(policy="none"))
        with meta_reference(hf):
            out = hf.generate(**prepared.hf_inputs(), max_new_tokens=8, do_sample=False)
        assert ours.token_ids == trim_generated(out[0, prepared.input_ids.numel():].tolist(), hf)
        cfg = TrimConfig(policy="target", target_fraction=0.3)
        trimmed = pipe.generate(PROMPTS[0], [imgs[name]], SamplingParams(max_tokens=8), cfg)
        with meta_reference(hf):
            assert trimmed.token_ids == reference_generate(hf, prepared, cfg, 8)
    # The trimmer stage alone: layer 0 (its only full layer) and the later cross layers' K/V projections.
    trimmer = Trimmer(load_model(ModelConfig(source=str(tmp_path), **CPU32), parts=("trim",)))
    layers = "model.language_model.layers."
    assert {n for n in _loaded_names(trimmer.loaded.model) if n.startswith(layers)} == {
        n for n, _ in hf.named_parameters() if n.startswith(f"{layers}0.") or any(
            n.startswith(f"{layers}{i}.cross_attn.{m}.") for i in (5, 7) for m in ("k_proj", "v_proj", "k_norm"))}
    prepared = pipe.prepare(PROMPTS[0], [imgs["1tile"]])
    trim = trimmer.trim(prepared, pipe.encoder.encode(prepared), cfg)
    assert trim.image.prefix_len > 0  # a blind prefix, which gets no cross-attention output
    (seq,) = pipe.engine.generate([trim], SamplingParams(max_tokens=8))
    with meta_reference(hf):
        assert seq.output_ids == reference_generate(hf, prepared, cfg, 8)


def test_target_policy_keeps_exactly_the_fraction_and_is_a_topk_union():
    gen = torch.Generator().manual_seed(0)
    for heads, n, fraction in [(32, 1601, 0.15), (32, 6404, 0.5), (4, 65, 0.3), (2, 7, 1.0)]:
        scores = torch.rand(heads, n, generator=gen)
        kept = select_target(scores, fraction)
        assert kept.numel() == topk_count(fraction, n)
        assert torch.equal(kept, select_budget(scores, kept.numel()))  # the rank-by-rank merge, found by search
        ranked = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        k = next(k for k in range(1, n + 1) if len(torch.unique(ranked[:, :k])) >= kept.numel())
        assert set(torch.unique(ranked[:, : k - 1]).tolist()) <= set(kept.tolist()) <= set(ranked[:, :k].reshape(-1).tolist())


def test_target_policy_and_long_prompt_equal_the_reference(tiny_pipeline, imgs):
    """Kept counts are predictable per image; a prompt longer than a scoring chunk selects as the reference does."""
    pipe, model = tiny_pipeline, tiny_pipeline.loaded.model
    long_prompt = " ".join(PROMPTS * 15)
    prepared = pipe.prepare(long_prompt, [imgs["2tile"], imgs["4tile"]])
    assert prepared.input_ids.numel() > 2 * ROW_CHUNK
    for cfg in (TrimConfig(policy="target", target_fraction=0.25), TrimConfig(k_ratio=0.1)):
        ours = pipe.generate(long_prompt, [imgs["2tile"], imgs["4tile"]], SamplingParams(max_tokens=8), cfg)
        with meta_reference(model):
            assert ours.token_ids == reference_generate(model, prepared, cfg, 8)
        if cfg.policy == "target":
            trim = pipe.trim(prepared, cfg)
            assert trim.image.kept_tokens == [topk_count(0.25, n) for n in trim.image.visual_tokens]


def test_stages_loaded_apart_give_the_pipelines_tokens(tiny_pipeline, imgs):
    """Encoder, trimmer and decoder each holding only their tensors (as Serve replicas do), both hand-off modes."""
    from pipeline.engine.llm_engine import LLMEngine
    from pipeline.model.encoder import VisionEncoder
    cfg = ModelConfig(**CPU32)
    encoder = VisionEncoder(load_model(cfg, parts=("vision",)))
    trimmer = Trimmer(load_model(cfg, parts=("trim",)))
    decoder = LLMEngine(load_model(cfg, parts=("text",)))
    assert decoder.loaded.model.model.vision_model.class_embedding.is_meta  # the decoder holds no vision tower
    assert trimmer.text.layers[-1].mlp.down_proj.weight.is_meta  # the trimmer holds no later layer
    # A 4-tile image and a 1-tile one (3 padding tiles, which nobody reads: the chat template's blind prefix
    # gets no cross-attention output).
    for name in ("4tile", "1tile"):
        prepared = tiny_pipeline.prepare(PROMPTS[1], [imgs[name]])
        visual = encoder.encode(prepared)
        expected = tiny_pipeline.generate(PROMPTS[1], [imgs[name]], SamplingParams(max_tokens=8),
                                          TrimConfig()).token_ids
        for ship in ("kv", "features"):
            trim = trimmer.trim(prepared, visual, TrimConfig(), ship=ship)
            assert trim.image.prefix_len > 0
            (seq,) = decoder.generate([trim], SamplingParams(max_tokens=8))
            assert seq.output_ids == expected
    # Only the decoder (it detokenizes) read the tokenizer: it is loaded on first use, ~0.2 GiB for Llama-3.2's.
    assert [s.loaded.__dict__.get("processor") is not None for s in (encoder, trimmer, decoder)] == [
        False, False, True]


FREE_PROBE = """
import sys, torch
from pipeline.memory import return_large_frees_to_os
if sys.argv[1] == "on":
    assert return_large_frees_to_os()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.ones(20 * 2**20 // 4); del x  # glibc's adaptive threshold rises to this size
before = rss()
y = torch.ones(16 * 2**20 // 4); del y
print(rss() - before)
"""


def test_large_frees_go_back_to_the_os():
    """After load_model's mallopt a freed activation-sized tensor leaves the process; without it glibc keeps it."""
    import subprocess

    kept = {mode: int(subprocess.run([sys.executable, "-c", FREE_PROBE, mode], capture_output=True, text=True,
                                     check=True).stdout) for mode in ("off", "on")}
    assert kept["off"] > 8 * 2**20 and kept["on"] < 2**20, kept

"""Layers split over several devices (how the 90B runs across a replica's GPUs): on CPU the same code path over
["cpu", "cpu"] and a 3-way split gives the single-device run's trim results and greedy tokens, through the in-process
Pipeline and the engine (batched, preempting); with 2+ GPUs the gpu-marked test does the same on cuda:0/cuda:1."""

import pytest
import torch

from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.inprocess import Pipeline
from pipeline.model.loader import load_model
from pipeline.model.placement import module_device, split_layers
from pipeline.model.trimmer import Trimmer
from tests.helpers import PROMPTS

TRIMS = [TrimConfig(policy="none"), TrimConfig(k_ratio=0.1)]


def test_split_is_contiguous_and_balanced():
    assert split_layers(8, 2) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert split_layers(8, 3) == [0, 0, 0, 1, 1, 1, 2, 2]
    counts = [split_layers(100, 4).count(g) for g in range(4)]
    assert counts == [25, 25, 25, 25]  # the 90B over 4 GPUs: 5 of each 25 layers cross-attention (3, 8, ... 98)
    # Layers a stage holds nothing of (the trimmer's after the first cross layer, bar the cross layers' K/V) do not
    # count toward the balance; each goes with the next held layer (the last part after the last one).
    held = [True, True, True, False, False, True, False, True]
    assert split_layers(8, 2, held) == [0, 0, 0, 1, 1, 1, 1, 1]
    assert split_layers(8, 2, held[:3] + [False] * 5) == [0, 0, 1, 1, 1, 1, 1, 1]


def _cases(pipe, imgs):
    return [(PROMPTS[0], [imgs["4tile"]]), (PROMPTS[1], [imgs["1tile"], imgs["2tile"]]), (PROMPTS[2], [])]


def _check_placement(pipe, devices):
    loaded, text = pipe.loaded, pipe.loaded.text
    n = len(text.layers)
    assert loaded.placement == split_layers(n, len(devices)) and set(loaded.placement) == set(range(len(devices)))
    want = [torch.device(d) for d in devices]
    for i, layer in enumerate(text.layers):
        assert module_device(layer) == want[loaded.placement[i]]
    assert text.embed_tokens.weight.device == want[0] and pipe.loaded.model.lm_head.weight.device == want[-1]
    assert module_device(loaded.model.model.vision_model) == want[0]
    kv = pipe.engine.kv  # one arena per placed device, each holding the K/V of its layers only
    assert len(kv.arenas) == len(devices) and [a.data.device for a in kv.arenas] == want
    for (cross, kv_layer), (a, _) in kv.layout.where.items():
        layer = next(i for i in range(n) if kv.kv_layer[i] == kv_layer and (i in loaded.cross_layers) == cross)
        assert a == loaded.placement[layer]


def _assert_same_request(a, b):
    """Two decode requests equal, every tensor (hidden rows, self and cross K/V, kept tokens, padding) and field."""
    pa, pb = a.to_payload(), b.to_payload()
    assert pa.fields == pb.fields and pa.tensors.keys() == pb.tensors.keys()
    for name, t in pa.tensors.items():
        assert torch.equal(t.cpu(), pb.tensors[name].cpu()), name


def _compare(single, split, imgs, max_tokens=6):
    for prompt, images in _cases(single, imgs):
        prepared = single.prepare(prompt, images)
        for trim in TRIMS if images else TRIMS[:1]:
            a, b = single.trim(prepared, trim), split.trim(split.prepare(prompt, images), trim)
            if images:
                _assert_same_request(a, b)
            params = SamplingParams(max_tokens=max_tokens)
            assert (split.generate(prompt, images, params, trim).token_ids
                    == single.generate(prompt, images, params, trim).token_ids)


@pytest.mark.parametrize("devices", [["cpu", "cpu"], ["cpu", "cpu", "cpu"]])
def test_layers_over_cpu_devices_give_the_same_outputs(tiny_pipeline, imgs, devices):
    split = Pipeline(ModelConfig(dtype="float32", devices=devices))
    _check_placement(split, devices)
    if len(devices) == 2:  # the 3-way split runs the engine below only (seconds matter in the default suite)
        _compare(tiny_pipeline, split, imgs)
    # The engine batched and preempting over the split arenas: the single-device engine's tokens.
    sources = [tiny_pipeline.trim(tiny_pipeline.prepare(p, i), TrimConfig(k_ratio=0.2))
               for p, i in _cases(tiny_pipeline, imgs)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    expected = [s.output_ids for s in LLMEngine(tiny_pipeline.loaded).generate(sources, params)]
    probe = LLMEngine(split.loaded, EngineConfig(block_size=4))
    need = max(probe.kv_bytes_for(s, SamplingParams(max_tokens=24)) for s in sources)
    small = LLMEngine(split.loaded, EngineConfig(kv_budget_bytes=int(need * 1.6), block_size=4, kv_watermark=0.0))
    seqs = [small.add_request(s, params) for s in sources]
    while small.has_work():
        small.step()
    assert small.stats().preemptions > 0, "the pool must be small enough to preempt"
    assert [s.output_ids for s in seqs] == expected


def test_trimmer_stage_over_cpu_devices_balances_the_layers_it_holds(tiny_pipeline, imgs):
    split = Trimmer(load_model(ModelConfig(dtype="float32", devices=["cpu", "cpu"]), parts=("trim",)))
    loaded = split.loaded
    held = [any(not p.is_meta for p in layer.parameters()) for layer in loaded.text.layers]
    first = loaded.first_cross
    assert held == [i <= first or i in loaded.cross_layers for i in range(len(held))]
    assert loaded.placement == split_layers(len(held), 2, held) != split_layers(len(held), 2)
    per_device = [sum(h for h, d in zip(held, loaded.placement) if d == g) for g in (0, 1)]
    assert abs(per_device[0] - per_device[1]) <= 1
    for images in ([imgs["1tile"]], [imgs["2tile"], imgs["4tile"]]):
        prepared = tiny_pipeline.prepare(PROMPTS[0], images)
        visual = tiny_pipeline.encoder.encode(prepared)
        a, b = tiny_pipeline.trimmer.trim(prepared, visual), split.trim(prepared, visual)
        assert a.image.prefix_len == b.image.prefix_len > 0
        _assert_same_request(a, b)


@pytest.mark.gpu
def test_layers_over_two_gpus_give_the_cpu_tokens(tiny_pipeline, imgs):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, have {torch.cuda.device_count()}")
    devices = ["cuda:0", "cuda:1"]
    split = Pipeline(ModelConfig(dtype="float32", devices=devices))
    _check_placement(split, devices)
    one = Pipeline(ModelConfig(dtype="float32", device="cuda"))
    _compare(one, split, imgs)

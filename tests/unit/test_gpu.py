"""CUDA: torch's varlen paged attention (one call a layer for the batch) equals the per-sequence path, and the
engine on CUDA gives the CPU engine's greedy tokens, preemption included. Skipped, with the reason, without a
GPU; scripts/gpu_check.sh runs these and the CUDA benchmarks in one command."""

import pytest
import torch

from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.attention import CpuAttention, VarlenPagedAttention
from pipeline.engine.kv_cache import KVCache
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.engine.step_batch import build_decode_batch
from tests.helpers import PROMPTS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device: varlen_attn is CUDA-only")]


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_varlen_paged_attention_equals_per_sequence(dtype, atol):
    torch.manual_seed(0)
    heads, kvh, hd = 32, 8, 128
    kv = KVCache(3 * 2**30, 40, [3, 8, 13, 18, 23, 28, 33, 38], kvh, hd, dtype, "cuda", block_size=256,
                 cross_layout="page")
    kv.arenas[0].data.normal_()
    lengths, kept = [1, 17, 200, 1200], [5, 300, 1601, 33]
    seqs = [kv.allocate(n, c) for n, c in zip(lengths, kept)]
    holes = kv.blocks.allocate(7)  # later pages land elsewhere: fragmented tables
    for s, n in zip(seqs, lengths):
        assert kv.grow(s, n + 40)
    kv.blocks.free(holes)
    lengths = [n + 40 for n in lengths]
    q = torch.randn(len(seqs), heads, 1, hd, dtype=dtype, device="cuda")
    loop, varlen = CpuAttention(kv, padded_elems=0), VarlenPagedAttention(kv)
    for masks in ([None] * 4, [None, None, torch.rand(kept[2], device="cuda") > 0.5, None]):
        batch = build_decode_batch([0] * len(seqs), lengths, seqs, masks, "cuda")
        want_step, got_step = loop.prepare(batch), varlen.prepare(batch)
        for kv_layer in (0, 31):
            want = loop.self_attn(q, want_step, kv_layer, hd**-0.5)
            got = varlen.self_attn(q, got_step, kv_layer, hd**-0.5)
            torch.testing.assert_close(got, want, atol=atol, rtol=0)
        for kv_layer in (0, 7):
            want = loop.cross_attn(q, want_step, kv_layer, hd**-0.5)
            got = varlen.cross_attn(q, got_step, kv_layer, hd**-0.5)
            torch.testing.assert_close(got, want, atol=atol, rtol=0)


def test_engine_on_cuda_equals_cpu_with_preemption(tiny_pipeline, imgs):
    from pipeline.inprocess import Pipeline

    gpu = Pipeline(ModelConfig(source="bundled:tiny-mllama", device="cuda", dtype="float32"))
    sources = []
    for prompt, names, cfg in ((PROMPTS[0], ["1tile"], TrimConfig(policy="none")),
                               (PROMPTS[1], ["4tile"], TrimConfig(k_ratio=0.15)),
                               (PROMPTS[1], ["2tile", "4tile"], TrimConfig(policy="mass", mass=0.5))):
        prepared = tiny_pipeline.prepare(prompt, [imgs[n] for n in names])
        sources.append(tiny_pipeline.trim(prepared, cfg))
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    want = [s.output_ids for s in LLMEngine(tiny_pipeline.loaded).generate(sources, params)]
    probe = LLMEngine(gpu.loaded, EngineConfig(kv_budget_bytes=2**20, block_size=4))
    need = max(probe.kv_bytes_for(s, SamplingParams(max_tokens=24)) for s in sources)
    for budget in (64 * 2**20, int(need * 1.4)):
        engine = LLMEngine(gpu.loaded, EngineConfig(kv_budget_bytes=budget, block_size=4, kv_watermark=0.0))
        got = [s.output_ids for s in engine.generate(sources, params)]
        assert got == want
        assert engine.stats().kv_used_bytes == 0
    assert engine.stats().preemptions > 0


def test_cuda_graphs_equal_eager_on_the_page_pools(tiny_pipeline, imgs):
    """Decode steps replayed from CUDA graphs (varlen over the page pools, batches padded to their bucket) give
    the eager engine's tokens, for image batches and text-only ones; the graphs were replayed."""
    from pipeline.inprocess import Pipeline
    from pipeline.types import DecodeRequest

    gpu = Pipeline(ModelConfig(source="bundled:tiny-mllama", device="cuda", dtype="float32"))
    images = [tiny_pipeline.trim(tiny_pipeline.prepare(PROMPTS[i % 2], [imgs[n]]), TrimConfig(k_ratio=0.15))
              for i, n in enumerate(["1tile", "4tile", "2tile"])]
    text = [tiny_pipeline.prepare(PROMPTS[3], []).input_ids.tolist()] * 3
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    for rows in (images, [DecodeRequest(ids) for ids in text]):
        eager = LLMEngine(gpu.loaded, EngineConfig(max_running=8, max_model_len=512, cuda_graphs=False))
        graphed = LLMEngine(gpu.loaded, EngineConfig(max_running=8, max_model_len=512))
        assert eager.runner.graphs is None and graphed.runner.graphs is not None
        replays = []
        run = graphed.runner.graphs.run
        graphed.runner.graphs.run = lambda seqs, run=run, replays=replays: replays.append(len(seqs)) or run(seqs)
        want = [s.output_ids for s in eager.generate(rows, params)]
        assert [s.output_ids for s in graphed.generate(rows, params)] == want
        assert replays and set(replays) == {3}

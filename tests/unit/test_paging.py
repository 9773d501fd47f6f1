"""KV in pages: exactness with preemption happening mid-stream, page accounting, fragmented pages, and
incremental detokenization."""

import asyncio

import pytest
import torch

from pipeline.config import EngineConfig, TrimConfig
from pipeline.engine.async_engine import AsyncLLMEngine
from pipeline.engine.block_manager import BlockManager, runs
from pipeline.engine.detokenizer import IncrementalDetokenizer
from pipeline.engine.kv_cache import KVCache
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.quality.reference import reference_generate, trim_generated
from pipeline.types import DecodeRequest
from tests.helpers import PROMPTS, meta_reference

MAX_NEW = 12


@pytest.fixture(scope="module")
def cases(tiny_pipeline, imgs):
    """(source, params, expected tokens): HF generate untrimmed, the reference trimmed, text-only."""
    pipe, model = tiny_pipeline, tiny_pipeline.loaded.model
    greedy = SamplingParams(max_tokens=MAX_NEW)
    out = []
    for prompt, names in ((PROMPTS[0], ["1tile"]), (PROMPTS[1], ["4tile"]), (PROMPTS[1], ["1tile", "4tile"])):
        prepared = pipe.prepare(prompt, [imgs[n] for n in names])
        with meta_reference(model):
            hf = model.generate(**prepared.hf_inputs(), max_new_tokens=MAX_NEW, do_sample=False)
        hf = trim_generated(hf[0, prepared.input_ids.numel():].tolist(), model)
        out.append((pipe.trim(prepared, TrimConfig(policy="none")), greedy, hf))
    for cfg, names in ((TrimConfig(k_ratio=0.15), ["4tile"]), (TrimConfig(policy="mass", mass=0.5), ["2tile", "4tile"])):
        prepared = pipe.prepare(PROMPTS[1], [imgs[n] for n in names])
        trim = pipe.trim(prepared, cfg)
        with meta_reference(model):
            out.append((trim, greedy, reference_generate(model, prepared, cfg, MAX_NEW)))
    ids = pipe.prepare(PROMPTS[3] + " and then tell me a story", []).input_ids.tolist()
    text = torch.tensor(ids)
    hf = model.generate(input_ids=text[None], attention_mask=torch.ones_like(text)[None], max_new_tokens=MAX_NEW,
                        do_sample=False)
    out.append((DecodeRequest(ids), greedy, trim_generated(hf[0, len(ids):].tolist(), model)))
    return out


def _small_engine(loaded, sources, max_tokens, fraction=1.6):
    """A pool that fits the largest request alone and a bit more: later growth must preempt."""
    probe = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**20, block_size=4))
    need = max(probe.kv_bytes_for(s, SamplingParams(max_tokens=max_tokens)) for s in sources)
    return LLMEngine(loaded, EngineConfig(kv_budget_bytes=int(need * fraction), block_size=4, kv_watermark=0.0))


def _pages(loaded, sources, max_tokens) -> tuple[int, int, int, int]:
    """(pages of every prompt, pages of their growth to max_tokens, the largest worst case, bytes a page)."""
    probe = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**20, block_size=4)).kv
    prompts = sum(probe.pages_needed(s.prompt_len, s.num_kept) for s in sources)
    worst = [probe.pages_needed(s.prompt_len + max_tokens, s.num_kept) for s in sources]
    return prompts, sum(worst) - prompts, max(worst), probe.blocks.page_bytes


def _overcommitted_engine(loaded, sources, max_tokens, swap_pages=None):
    """A pool that admits every prompt at once but holds only half of their growth: once they all run, growing
    must preempt (a pool merely larger than the largest request may instead hold admission until others end).
    swap_pages (default: the smallest swap space that still admits them all at once) bounds the swap space."""
    prompts, growth, largest, page = _pages(loaded, sources, max_tokens)
    swap_pages = largest + growth - growth // 2 if swap_pages is None else swap_pages
    return LLMEngine(loaded, EngineConfig(kv_budget_bytes=(prompts + growth // 2) * page, block_size=4,
                                          kv_watermark=0.0, swap_budget_bytes=swap_pages * page))


def test_exact_with_preemption_mid_stream(tiny_pipeline, cases):
    """HF generate / reference tokens hold for every request while the pool is so small that they preempt."""
    loaded = tiny_pipeline.loaded
    sources = [c[0] for c in cases]
    seeded = SamplingParams(max_tokens=40, temperature=0.9, top_k=50, seed=7, ignore_eos=True)
    engine = LLMEngine(loaded, EngineConfig(block_size=4))
    (alone_seeded,) = engine.generate([sources[1]], seeded)
    small = _small_engine(loaded, sources, 40)
    seqs = [small.add_request(s, p) for s, p, _ in cases] + [small.add_request(sources[1], seeded)]
    seqs += [small.add_request(sources[4], SamplingParams(max_tokens=40, ignore_eos=True)) for _ in range(2)]
    while small.has_work():
        small.step()
        st = small.stats()
        assert st.kv_used_bytes == small.kv.blocks.used * small.kv.blocks.page_bytes <= st.kv_budget_bytes
        assert st.kv_written_bytes <= st.kv_used_bytes
    assert small.stats().preemptions > 0, "the pool must be small enough to preempt"
    for seq, (_, _, expected) in zip(seqs, cases):
        assert seq.output_ids == expected
    assert seqs[len(cases)].output_ids == alone_seeded.output_ids
    assert [len(s.output_ids) for s in seqs[-2:]] == [40, 40]
    assert small.stats().kv_used_bytes == 0


def test_stream_neither_loses_nor_repeats_tokens_when_preempted(tiny_pipeline, cases):
    loaded = tiny_pipeline.loaded
    sources = [c[0] for c in cases[:4]]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    alone = [LLMEngine(loaded).generate([s], params)[0] for s in sources]
    small = _overcommitted_engine(loaded, sources, 30)
    engine = AsyncLLMEngine(small)

    async def one(src):
        ids, text = [], ""
        async for out in engine.generate(src, params):
            ids += out.new_token_ids
            text += out.new_text
        return ids, text

    async def main():
        return await asyncio.gather(*[one(s) for s in sources])

    try:
        got = asyncio.run(main())
    finally:
        engine.shutdown()
    assert small.stats().preemptions > 0
    assert [g[0] for g in got] == [a.output_ids for a in alone]
    assert [g[1] for g in got] == [a.text for a in alone]
    assert small.stats().kv_used_bytes == 0


@pytest.mark.parametrize("room", ["all_at_once", "tight", "none"])
def test_bounded_swap_never_overflows_and_tokens_stay_exact(tiny_pipeline, cases, room):
    """The swap space's limit holds at every step and every request's tokens stay exact. all_at_once: the smallest
    swap admitting every request at once (they preempt, as with unbounded swap); tight: less, so admission holds
    some back; none: no swap at all, so nothing is ever preempted."""
    loaded, sources = tiny_pipeline.loaded, [c[0] for c in cases]
    _, growth, largest, page = _pages(loaded, sources, MAX_NEW)
    swap_pages = {"all_at_once": None, "tight": largest + growth // 4, "none": 0}[room]
    engine = _overcommitted_engine(loaded, sources, MAX_NEW, swap_pages)
    limit = engine.cfg.swap_budget_bytes
    seqs = [engine.add_request(s, p) for s, p, _ in cases]
    peak_running = peak_swap = 0
    while engine.has_work():
        engine.step()
        st = engine.stats()
        assert st.swap_used_bytes == sum(s.swapped.nbytes for s in engine.scheduler.swapped) <= limit
        peak_running, peak_swap = max(peak_running, st.running), max(peak_swap, st.swap_used_bytes)
    assert [s.output_ids for s in seqs] == [c[2] for c in cases]
    st = engine.stats()
    assert st.kv_used_bytes == st.swap_used_bytes == 0 and engine.scheduler.swap.committed == 0
    if room == "all_at_once":
        assert peak_running == len(cases) and st.preemptions > 0 and peak_swap > 0
    elif room == "tight":
        assert peak_running < len(cases), "the swap space was meant to hold admission back"
    else:
        assert st.preemptions == 0 and peak_running < len(cases)


def test_reserved_mode_holds_fewer_than_paged(tiny_pipeline, cases):
    loaded = tiny_pipeline.loaded
    src = cases[3][0]
    counts = {}
    for mode in ("reserved", "paged"):
        engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**23, kv_allocation=mode, max_running=512,
                                                max_model_len=2048))
        for _ in range(200):
            engine.add_request(src, SamplingParams(max_tokens=1024))
        counts[mode] = engine.count_admissible()
    assert counts["paged"] >= 3 * counts["reserved"] >= 3


def test_fragmented_pages_are_gathered_exactly(tiny_pipeline, cases):
    """Pages forced apart (another holder between every page) give the same tokens as one contiguous run."""
    loaded = tiny_pipeline.loaded
    src, params = cases[3][0], SamplingParams(max_tokens=20, ignore_eos=True)
    expected = LLMEngine(loaded, EngineConfig(block_size=4)).generate([src], params)[0].output_ids
    engine = LLMEngine(loaded, EngineConfig(block_size=4, kv_watermark=0.0))
    blocks = engine.kv.blocks
    holes = blocks.allocate(blocks.num_pages)
    blocks.free(holes[::2])  # every other page free: nothing contiguous is left
    seq = engine.add_request(src, params)
    while engine.has_work():
        engine.step()
        if seq.pages is not None:
            assert runs(seq.pages.self_pages) == len(seq.pages.self_pages) and seq.pages.self_base is None
    assert seq.output_ids == expected


def test_block_manager_keeps_runs_contiguous_and_counts_references():
    bm = BlockManager(64, 100)
    a = bm.allocate(4)
    b = bm.allocate(4)
    assert runs(a) == runs(b) == 1 and set(a).isdisjoint(b)
    grown = bm.allocate(1, after=a[-1])
    assert grown == [a[-1] + 1], "a sequence grows into the page after its last"
    bm.share(a)
    bm.free(a)
    assert bm.used == 9 and bm.used_bytes == 900
    bm.free(a + grown + b)
    assert bm.used == 0 and bm.free_pages == 64
    with pytest.raises(AssertionError):
        bm.free(a)


class _CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def decode(self, ids, **kw):
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, **kw)


def test_incremental_detokenizer_equals_full_decode_in_constant_work(tiny_pipeline):
    tok = tiny_pipeline.loaded.processor.tokenizer
    text = "Voilà: a naïve café — 東京 🙂 and more words, " * 8
    ids = tok.encode(text, add_special_tokens=False)
    counting = _CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, stop=[])
    streamed = []
    for n in range(1, len(ids) + 1):
        before = detok.text
        detok.add(ids[:n], final=n == len(ids))
        assert detok.text.startswith(before) and "\ufffd" not in detok.text[len(before):] or n == len(ids)
        streamed.append(detok.text[len(before):])
    assert "".join(streamed) == tok.decode(ids, skip_special_tokens=True)
    assert counting.longest <= 16, f"decoded {counting.longest} tokens at once: not incremental"
    cut = IncrementalDetokenizer(tok, stop=["東京"])
    for n in range(1, len(ids) + 1):
        if cut.add(ids[:n]):
            break
    assert cut.text == text[: text.index("東京")]


def test_engine_detokenizes_incrementally(tiny_pipeline, cases):
    engine = LLMEngine(tiny_pipeline.loaded)
    full_decode = engine.tokenizer
    engine.output.tokenizer = counting = _CountingTokenizer(full_decode)
    (seq,) = engine.generate([cases[3][0]], SamplingParams(max_tokens=48, ignore_eos=True))
    assert seq.text == full_decode.decode(seq.output_ids, skip_special_tokens=True)
    assert 0 < counting.longest <= 16, f"decoded {counting.longest} tokens at once: the whole output every step"


def test_n_completions_share_pages_and_equal_separate_requests(tiny_pipeline, cases):
    """n = 3 seeded: completion i equals a lone request seeded seed + i; the image's and prompt's pages are held
    once; with a pool so small that siblings preempt each other, nothing changes."""
    loaded = tiny_pipeline.loaded
    src = cases[3][0]
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=5, ignore_eos=True, logprobs=True, top_logprobs=3)
    alone = [LLMEngine(loaded).generate([src], params.model_copy(update={"seed": 5 + i}))[0] for i in range(3)]
    single = LLMEngine(loaded)
    single.add_request(src, params)
    single.step()
    one_bytes = single.stats().kv_used_bytes
    for pool in (LLMEngine(loaded), _small_engine(loaded, [src], 24, fraction=1.3)):
        seq = pool.add_request(src, params.model_copy(update={"n": 3}))
        outs = pool.step()
        assert [o.index for o in outs] == [0, 1, 2]
        if pool.stats().preemptions == 0 and pool.kv.blocks.num_pages > 100:
            assert pool.stats().kv_used_bytes == one_bytes, "siblings share every page after the prefill"
        while pool.has_work():
            outs += pool.step()
        for i, s in enumerate([seq] + seq.siblings):
            assert s.index == i and s.output_ids == alone[i].output_ids
            mine = [o for o in outs if o.index == i]
            assert [t for o in mine for t in o.new_token_ids] == alone[i].output_ids
            assert all(len(o.top_logprobs[0]) == 3 and o.top_logprobs[0][0][1] >= o.logprobs[0] - 1e-6
                       for o in mine if o.new_token_ids)
        assert pool.stats().kv_used_bytes == 0 and pool.num_requests == 0
    assert pool.stats().preemptions > 0


def test_cross_page_layout_is_the_pool_a_block_table_indexes():
    """The "page" layout (CUDA's): page p of cross_pool(kv_layer) holds tokens p*size.. of the sequence using it,
    and writes read back the same through fragmented pages."""
    kv = KVCache(2**20, 6, [1, 4], 2, 8, torch.float32, "cpu", block_size=4, cross_layout="page")
    bm = kv.blocks
    holes = bm.allocate(bm.num_pages)
    bm.free(holes[::3])
    seq = kv.allocate(0, 21)
    assert runs(seq.cross_pages) > 1
    cross = torch.randn(2, 2, 2, 21, 8)
    kv.write_cross(seq, cross)
    torch.testing.assert_close(kv.read_cross(seq), cross, rtol=0, atol=0)
    k_pool, v_pool = kv.cross_pool(1)
    size = kv.cross_block_size
    for i, page in enumerate(seq.cross_pages):
        n = min(size, 21 - i * size)
        torch.testing.assert_close(k_pool[page, :n], cross[1, 0, :, i * size : i * size + n].transpose(0, 1))
        torch.testing.assert_close(v_pool[page, :n], cross[1, 1, :, i * size : i * size + n].transpose(0, 1))


def test_n_completions_at_capacity_never_exceed_max_running(tiny_pipeline, cases):
    """8 requests of n = 8 into max_running 16 with a pool so small that siblings preempt each other: a request
    takes its n running slots (and n worst cases of the swap space) from admission, though its siblings fork only
    after its prompt's last chunk, so at most two requests run at once, never more than 16 sequences; every request
    finishes, every completion equals the same completion of every other request (same prompt and seed, whatever was
    preempted), and completion i equals a lone request seeded seed + i."""
    loaded, src = tiny_pipeline.loaded, cases[3][0]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True, n=8)
    probe = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**20, block_size=4)).kv
    prompt_pages = probe.pages_needed(src.prompt_len, src.num_kept)
    # A third request's prompt fits (only max_running may hold it back), two requests' 16 growing completions do not.
    pool = 3 * prompt_pages + 4
    engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=pool * probe.blocks.page_bytes, block_size=4,
                                            kv_watermark=0.0, max_running=16))
    seqs = [engine.add_request(src, params) for _ in range(8)]
    assert engine.count_admissible() == 2  # 2 x 8 slots
    peak = 0
    while engine.has_work():
        engine.step()
        st = engine.stats()
        assert st.running <= engine.scheduler.running_slots() <= 16
        peak = max(peak, st.running)
    st = engine.stats()
    assert peak == 16 and st.preemptions > 0, (peak, st.preemptions)
    assert st.kv_used_bytes == st.swap_used_bytes == engine.scheduler.swap.committed == 0 and engine.num_requests == 0
    outputs = [[s.output_ids for s in [seq] + seq.siblings] for seq in seqs]
    assert all(len(o) == 8 and all(len(ids) == 8 for ids in o) for o in outputs)
    assert all(o == outputs[0] for o in outputs)
    for i in (0, 7):
        (alone,) = LLMEngine(loaded).generate([src], params.model_copy(update={"n": 1, "seed": 3 + i}))
        assert outputs[0][i] == alone.output_ids


def test_a_full_swap_space_leaves_the_scheduler_consistent(tiny_pipeline, cases):
    """If a preemption's copy did not fit the swap space (the admission rule makes it impossible: forced here by
    shrinking the space under running sequences), the step raises with the victim still running with its pages, so
    failing every request afterwards frees everything (it raised ValueError once: the victim was out of the running
    list yet RUNNING)."""
    loaded, sources = tiny_pipeline.loaded, [c[0] for c in cases[:4]]
    engine = _overcommitted_engine(loaded, sources, 30)
    for s in sources:
        engine.add_request(s, SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    engine.scheduler.swap.limit_bytes = 0
    with pytest.raises(RuntimeError, match="swap space full"):
        for _ in range(60):
            engine.step()
    assert all(s.pages is not None for s in engine.scheduler.running)
    outs = engine.fail_all(RuntimeError("step failed"))
    assert len(outs) == len(sources) and all(o.finish_reason == "error" for o in outs)
    assert engine.stats().kv_used_bytes == 0 and not engine.has_work() and engine.scheduler.swap.committed == 0

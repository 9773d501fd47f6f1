"""Prefix caching: the pages' bookkeeping (held, cached and free, LRU eviction), and exactness: every request's
tokens with the cache equal its tokens without it, with chunked prefill, preemption and swap, n > 1, trimming on
and off, two images and evictions forced by a small pool; cache salts separate."""

import dataclasses

import pytest
import torch

from pipeline.config import EngineConfig, TrimConfig
from pipeline.engine.block_manager import BlockManager
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.prefix_cache import PrefixCache, page_hashes
from pipeline.engine.sampling import SamplingParams
from pipeline.model.inputs import prepare_prompt
from pipeline.model.trimmer import Trimmer
from pipeline.model.trimmer_cache import TrimmerPrefixCache
from pipeline.orchestration import trimmer_input
from pipeline.types import DecodeRequest

SYSTEM = "You answer questions about pictures. Be brief, be exact, and say when you are unsure. " * 3


def _messages(question: str, images: int) -> list[dict]:
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


@pytest.fixture(scope="module")
def requests(tiny_pipeline, imgs):
    """Image prompts behind one system prompt (untrimmed, trimmed, two images) and a growing text-only chat."""
    pipe = tiny_pipeline
    cfg = pipe.loaded.cfg

    def prepared(question, names):
        return prepare_prompt(pipe.loaded.processor, _messages(question, len(names)), [imgs[n] for n in names],
                              cfg.max_images, cfg.max_prompt_tokens)

    out = [pipe.trim(prepared("what colour is it", ["1tile"]), TrimConfig(policy="none")),
           pipe.trim(prepared("which is larger", ["1tile", "2tile"]), TrimConfig(k_ratio=0.15))]
    turn = prepared("tell me a story", []).input_ids.tolist()
    return out + [DecodeRequest(turn), DecodeRequest(turn + turn[-12:])]


# Greedy for some, seeded sampling with n = 2 for the others (siblings fork the cached pages too).
SEEDED = SamplingParams(max_tokens=4, temperature=0.9, top_k=50, seed=3, n=2, ignore_eos=True)
PARAMS = [SamplingParams(max_tokens=4), SEEDED, SEEDED, SamplingParams(max_tokens=4)]


def _tokens(seqs) -> list[list[list[int]]]:
    return [[s.output_ids for s in [seq] + seq.siblings] for seq in seqs]


def _run(engine: LLMEngine, requests, params, rounds: int = 2):
    """Every request `rounds` times, a round after the other (later rounds find the earlier ones' pages)."""
    return [engine.generate(requests, params) for _ in range(rounds)]


def test_pages_cached_free_evicted_lru_and_shared_once():
    prefix = PrefixCache(block_size=2, model_id="m")
    blocks = BlockManager(6, page_bytes=1, prefix=prefix)
    a = blocks.allocate(3)
    h = prefix.hashes([1, 2, 3, 4, 5, 6], 6, None)
    blocks.register(h, a)
    assert prefix.match(h) == a and prefix.match(prefix.hashes([1, 2, 3, 4, 5, 6], 6, "salt")) == []
    assert prefix.match(prefix.hashes([1, 2, 9, 9], 4, None)) == a[:1]  # the chain stops at the first difference
    blocks.free(a)
    assert blocks.free_pages == 6 and blocks.unheld_cached == 3  # kept, counted free
    blocks.share(a[:2])  # a hit revives them: held again, not evictable
    assert blocks.used == 2 and blocks.unheld_cached == 1
    b = blocks.allocate(4)  # 3 empty pages + the LRU unheld cached one (a[2], the chain's tail)
    assert a[2] in b and prefix.match(h) == a[:2] and prefix.evictions == 1
    blocks.free(b)
    blocks.free(a[:2])
    assert blocks.used == 0 and blocks.unheld_cached == 2
    blocks.reset_prefix()
    assert blocks.unheld_cached == 0 and prefix.match(h) == [] and blocks.free_pages == 6
    assert page_hashes([1, 2, 3], 2, b"r", 3) == page_hashes([1, 2, 7], 2, b"r", 3)  # full pages only


def test_cached_tokens_equal_uncached_everywhere(tiny_pipeline, requests):
    """Greedy and seeded n = 2, chunked prefill (a 16-row step budget): tokens equal the cache-off engine's;
    later rounds take the system prompt and the chat's history from the cache (never the last row)."""
    loaded = tiny_pipeline.loaded
    cfg = EngineConfig(block_size=4, step_token_budget=16)
    off = LLMEngine(loaded, cfg.model_copy(update={"prefix_caching": False}))
    on = LLMEngine(loaded, cfg)
    (expected,) = _run(off, requests, PARAMS, rounds=1)
    rounds = _run(on, requests, PARAMS)
    for seqs in rounds:
        assert _tokens(seqs) == _tokens(expected)
    assert all(0 < s.cached_tokens < s.prompt_len for s in rounds[1])
    assert all(s.cached_tokens <= s.image.prefix_len for s in rounds[1] if s.image is not None)
    assert on.kv.blocks.used == 0 and on.kv.prefix.cached_pages > 0


def test_exact_with_preemption_swap_and_evictions(tiny_pipeline, requests):
    """A pool that admits every prompt but holds half their growth: sequences preempt and swap (a swapped copy of
    a shared page is its own), cached pages are evicted and made again."""
    loaded = tiny_pipeline.loaded
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    probe = LLMEngine(loaded, EngineConfig(block_size=4, kv_budget_bytes=2**20)).kv
    prompts = sum(probe.pages_needed(r.prompt_len, r.num_kept) for r in requests)
    growth = sum(probe.pages_needed(r.prompt_len + 8, r.num_kept) for r in requests) - prompts
    cfg = EngineConfig(block_size=4, kv_budget_bytes=(prompts + growth // 2) * probe.blocks.page_bytes,
                       kv_watermark=0.0)
    off = LLMEngine(loaded, cfg.model_copy(update={"prefix_caching": False}))
    on = LLMEngine(loaded, cfg)
    (expected,) = _run(off, requests, params, rounds=1)
    assert [_tokens(seqs) for seqs in _run(on, requests, params)] == [_tokens(expected)] * 2
    assert on.scheduler.preemptions > 0 and on.kv.prefix.hit_tokens > 0
    # A prompt of new tokens as large as the pool: the cached pages no one holds are evicted for it.
    filler = (requests[2].prompt_token_ids[::-1] * 50)[: (on.kv.blocks.num_pages - 1) * on.kv.block_size - 1]
    on.generate([DecodeRequest(filler)], SamplingParams(max_tokens=1))
    assert on.kv.prefix.evictions > 0
    assert _tokens(on.generate(requests, params)) == _tokens(expected)
    assert on.kv.blocks.used == 0


def test_admission_counts_a_cached_page_once(tiny_pipeline, requests):
    """A pool that holds three of a prompt alone holds more of it once its pages are cached (the dry run agrees)."""
    loaded, text, params = tiny_pipeline.loaded, requests[3], SamplingParams(max_tokens=2)
    probe = LLMEngine(loaded, EngineConfig(block_size=4, kv_budget_bytes=2**20)).kv
    cfg = EngineConfig(block_size=4, kv_budget_bytes=3 * probe.bytes_needed(text.prompt_len + 2, 0), kv_watermark=0.0)
    admitted = {}
    for caching in (False, True):
        engine = LLMEngine(loaded, cfg.model_copy(update={"prefix_caching": caching}))
        engine.generate([text], params)
        for _ in range(8):
            engine.add_request(text, params)
        counted = engine.count_admissible()
        engine.step()
        admitted[caching] = engine.stats().running
        assert counted == admitted[caching]
        engine.abort_all()
    assert admitted[False] == 3 and admitted[True] > 3


def test_cache_salt_separates(tiny_pipeline, requests):
    engine = LLMEngine(tiny_pipeline.loaded, EngineConfig(block_size=4))
    text = requests[3]

    def cached(salt):
        (seq,) = engine.generate([text], SamplingParams(max_tokens=2, cache_salt=salt))
        return seq.cached_tokens

    assert cached("alice") == 0 and cached("bob") == 0 and cached(None) == 0
    assert cached("alice") > 0 and cached("bob") > 0 and cached(None) > 0
    # The first token's logits from the cached rows equal a prefill of every row (within 1e-4; tokens above).
    uncached = LLMEngine(tiny_pipeline.loaded, EngineConfig(block_size=4, prefix_caching=False))
    torch.testing.assert_close(engine.prefill_logits(text), uncached.prefill_logits(text), atol=1e-4, rtol=0)
    assert engine.kv.prefix.hit_tokens > 0
    engine.reset_prefix_cache()
    assert cached("alice") == 0


# ---- the trimmer's prefix cache: it computes and ships only the rows after its cached pages


@pytest.fixture(scope="module")
def trimmer_inputs(tiny_pipeline, imgs):
    """Trimmer inputs (prompt, features, trim config) behind the shared system prompt: one image untrimmed, two
    images trimmed, another image elastic; and each one's decode request from a trimmer with no cache."""
    pipe, cfg = tiny_pipeline, tiny_pipeline.loaded.cfg
    out = []
    for question, names, trim in (("what colour is it", ["1tile"], TrimConfig(policy="none")),
                                  ("which is larger", ["1tile", "2tile"], TrimConfig(k_ratio=0.15)),
                                  ("where is it", ["4tile"], TrimConfig(policy="elastic", pressure=0.7))):
        prepared = prepare_prompt(pipe.loaded.processor, _messages(question, len(names)), [imgs[n] for n in names],
                                  cfg.max_images, cfg.max_prompt_tokens)
        out.append((trimmer_input(prepared), pipe.encoder.encode(prepared), trim))
    return out, [Trimmer(pipe.loaded).trim(p, v, t) for p, v, t in out]


def _cached_trimmer(loaded, max_bytes: int = 2**30) -> Trimmer:
    """Pages of 4 rows where the engines below page by 6 (EngineConfig(block_size=4) as this model's layout rounds
    it; TrimmerPrefixCache.sized would match them): a decoder's cached rows may end before the trimmer's start, and
    it runs the rows between as text."""
    return Trimmer(loaded, prefix_cache=TrimmerPrefixCache(max_bytes, block_size=4, model_id="tiny"))


def test_trimmer_cache_ships_only_the_new_rows_and_keeps_the_same_tokens(tiny_pipeline, trimmer_inputs):
    """The second prompt behind a cached system prompt: the trimmer computes only the rows after the cached pages
    (in one batch and alone), keeps exactly the tokens an uncached trimmer keeps, and its hidden rows and K/V are
    the uncached ones' from `start` on; the hand-off carries `start`."""
    inputs, expected = trimmer_inputs
    trimmer = _cached_trimmer(tiny_pipeline.loaded)
    first = trimmer.trim(*inputs[0])
    assert first.resume.start == 0 and trimmer.rows_computed == first.prompt_len
    rows = trimmer.rows_computed
    later = trimmer.trim_batch(*map(list, zip(*inputs[1:])))
    for got, want in zip([first, *later], expected):
        start = got.resume.start
        assert start == (0 if got is first else want.image.prefix_len // 4 * 4)
        assert torch.equal(got.image.kept_positions, want.image.kept_positions)
        torch.testing.assert_close(got.resume.hidden, want.resume.hidden[start:], atol=1e-5, rtol=0)
        torch.testing.assert_close(got.resume.self_kv, want.resume.self_kv[..., start:, :], atol=1e-5, rtol=0)
        torch.testing.assert_close(got.resume.cross.kv, want.resume.cross.kv, atol=1e-5, rtol=0)
        assert DecodeRequest.from_payload(got.to_payload()).resume.start == start
    assert trimmer.rows_computed - rows == sum(r.prompt_len - r.resume.start for r in later)
    assert trimmer.prefix_cache.stats()["hit_rows"] == sum(r.resume.start for r in later)
    # Another salt shares nothing.
    salted = dataclasses.replace(inputs[1][0], cache_salt="tenant-b")
    assert trimmer.trim(salted, *inputs[1][1:]).resume.start == 0
    # A cache of three pages keeps the chain's head (its tail is evicted first): the next trim starts after it.
    page = trimmer.prefix_cache.bytes // len(trimmer.prefix_cache.pages)
    small = _cached_trimmer(tiny_pipeline.loaded, max_bytes=3 * page)
    small.trim(*inputs[0])
    got = small.trim(*inputs[1])
    assert small.prefix_cache.evictions > 0 and got.resume.start == 12
    assert torch.equal(got.image.kept_positions, expected[1].image.kept_positions)
    torch.testing.assert_close(got.resume.hidden, expected[1].resume.hidden[12:], atol=1e-5, rtol=0)


def test_trimmer_cache_evicts_least_recently_used_tail_first():
    cache = TrimmerPrefixCache(max_bytes=3 * 2 * 4, block_size=1, model_id="m")  # three pages of 2 floats
    kv = torch.arange(8.0).reshape(1, 1, 1, 4, 2)  # (layers, 2 -> 1 here, KVH, rows, hd)
    chain = cache.hashes([1, 2, 3, 4], 4, None)
    cache.put(chain, kv)
    assert len(cache.pages) == 3 and cache.evictions == 1
    assert len(cache.match(chain)) == 3  # the chain's tail went, its head stays
    cache.put(cache.hashes([9, 9], 2, None), kv[..., :2, :])  # two new pages: the old chain's least recent go
    assert len(cache.match(chain)) == 1 and cache.bytes <= cache.max_bytes


def test_decoder_fills_rows_the_trimmer_left_out_exactly(tiny_pipeline, trimmer_inputs):
    """Requests whose resume state starts after the trimmer's cached rows, against the same requests trimmed without
    a cache, all on a cache-off engine: equal tokens (greedy, seeded n = 2, with chunked prefill) when the decoder
    has no cached page (it runs the missing blind rows from the first layer, as text), when it has them, and in a
    pool small enough to preempt and swap; prompt log-probabilities too."""
    inputs, expected_requests = trimmer_inputs
    loaded = tiny_pipeline.loaded
    trimmer = _cached_trimmer(loaded)
    trimmer.trim(*inputs[0])
    requests = [expected_requests[0]] + trimmer.trim_batch(*map(list, zip(*inputs[1:])))
    assert [r.resume.start > 0 for r in requests] == [False, True, True]
    params = [SamplingParams(max_tokens=6), SEEDED, SamplingParams(max_tokens=6, ignore_eos=True)]
    cfg = EngineConfig(block_size=4, step_token_budget=16)
    (expected,) = _run(LLMEngine(loaded, cfg.model_copy(update={"prefix_caching": False})), expected_requests,
                       params, rounds=1)
    cold = LLMEngine(loaded, cfg.model_copy(update={"prefix_caching": False}))
    assert _tokens(cold.generate(requests, params)) == _tokens(expected)
    assert cold.stats().prompt_rows_computed == sum(r.prompt_len for r in requests)  # every row, some as text
    warm = LLMEngine(loaded, cfg)
    for seqs in _run(warm, requests[::-1], params[::-1]):  # the last request first: its rows run as text, then cached
        assert _tokens(seqs) == _tokens(expected)[::-1]
    assert warm.kv.prefix.hit_tokens > 0
    # A pool holding the prompts and half their growth: preemption and swap while the text-run rows are in pages.
    probe = LLMEngine(loaded, EngineConfig(block_size=4, kv_budget_bytes=2**20)).kv
    prompts = sum(probe.pages_needed(r.prompt_len, r.num_kept) for r in requests)
    growth = sum(probe.pages_needed(r.prompt_len + 12, r.num_kept) for r in requests) - prompts
    small = LLMEngine(loaded, cfg.model_copy(update={
        "kv_budget_bytes": (prompts + growth // 4) * probe.blocks.page_bytes, "kv_watermark": 0.0}))
    greedy = [SamplingParams(max_tokens=12, ignore_eos=True)] * 3
    (expected,) = _run(LLMEngine(loaded, cfg), expected_requests, greedy, rounds=1)
    assert _tokens(small.generate(requests, greedy)) == _tokens(expected)
    assert small.scheduler.preemptions > 0, f"sheds {small.scheduler.sheds}"
    # Prompt log-probabilities: every row scored, the text-run ones too.
    scored = SamplingParams(max_tokens=1, prompt_logprobs=1)
    (want,), (got,) = (LLMEngine(loaded, cfg).generate([r], scored) for r in (expected_requests[1], requests[1]))
    assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == requests[1].prompt_len - 1
    for a, b in zip(got.prompt_logprobs, want.prompt_logprobs):
        assert (a is None) == (b is None) and (a is None or abs(a.logprob - b.logprob) < 1e-4)


def test_trimmer_cache_pages_as_the_decoder_does(tiny_pipeline):
    """Serve's and the batch job's trimmer cache pages by the decoder engine's page (its layout rounds the configured
    block_size), so its cached rows end where the decoder's do and the decoder never runs a gap as text."""
    loaded = tiny_pipeline.loaded
    for block_size in (4, 16, 17):
        engine = LLMEngine(loaded, EngineConfig(block_size=block_size, kv_budget_bytes=2**20))
        assert TrimmerPrefixCache.sized(1, block_size, loaded).block_size == engine.kv.block_size
    assert TrimmerPrefixCache.sized(0, 16, loaded) is None

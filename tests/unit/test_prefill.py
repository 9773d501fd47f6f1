"""Batched and chunked prefill: several prompts in one forward == each alone, chunked == unchunked (first-step
logits within 1e-4, greedy tokens equal), preemption and abort mid-prefill, running streams fed every step."""

import pytest
import torch

from pipeline.config import EngineConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.types import DecodeRequest
from tests.helpers import PROMPTS

WHOLE = 1 << 20  # a step budget no prompt here reaches: every prompt in one chunk
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def sources(tiny_pipeline, imgs):
    """Image prompts (each with a blind prefix; padding tiles for the 1-tile ones), several images,
    trimmed and not, K/V or features shipped, and text-only prompts, short and long (265 tokens)."""
    pipe = tiny_pipeline
    long_text = " ".join(PROMPTS * 6)
    specs = [
        (PROMPTS[0], ["1tile"], TrimConfig(policy="none"), "kv"),
        (PROMPTS[1], ["4tile"], TrimConfig(k_ratio=0.1), "kv"),
        (PROMPTS[1], ["1tile", "4tile"], TrimConfig(policy="mass", mass=0.4), "kv"),
        (PROMPTS[2], ["2tile"], TrimConfig(k_ratio=0.3), "features"),
        (long_text, ["1tile"], TrimConfig(k_ratio=0.2), "kv"),
    ]
    out = [pipe.trim(pipe.prepare(p, [imgs[n] for n in names]), cfg, ship=ship) for p, names, cfg, ship in specs]
    out += [DecodeRequest(pipe.prepare(p, []).input_ids.tolist()) for p in (PROMPTS[3], long_text)]
    assert all(s.image.prefix_len > 0 for s in out[:5])
    return out


@pytest.fixture(scope="module")
def alone(tiny_pipeline, sources):
    """Each prompt on its own, in one chunk: (first-step logits, greedy tokens)."""
    loaded = tiny_pipeline.loaded
    logits = [LLMEngine(loaded).prefill_logits(s) for s in sources]
    tokens = [LLMEngine(loaded, EngineConfig(step_token_budget=WHOLE)).generate([s], GREEDY)[0].output_ids
              for s in sources]
    return logits, tokens


class Recorder:
    """Every prefill forward's chunks (request id, start, end) and the prompt logits it returned, by request."""

    def __init__(self, engine: LLMEngine, monkeypatch):
        self.calls, self.logits = [], {}
        real = engine.runner.prefill

        def prefill(chunks):
            self.calls.append([(c.seq.request_id, c.start, c.end) for c in chunks])
            seqs, logits = real(chunks)
            self.logits.update({s.request_id: row for s, row in zip(seqs, logits)})
            return seqs, logits

        monkeypatch.setattr(engine.runner, "prefill", prefill)


def _run(engine: LLMEngine, sources, params=GREEDY):
    seqs = [engine.add_request(s, params, f"r{i}") for i, s in enumerate(sources)]
    while engine.has_work():
        engine.step()
    assert engine.stats().kv_used_bytes == 0
    return seqs


def _assert_same(rec: Recorder, seqs, alone, which=None):
    logits, tokens = alone
    for i, seq in zip(which or range(len(seqs)), seqs):
        torch.testing.assert_close(rec.logits[seq.request_id], logits[i], atol=1e-4, rtol=0)
        assert int(rec.logits[seq.request_id].argmax()) == int(logits[i].argmax())
        assert seq.output_ids == tokens[i], f"source {i}"


def test_batched_prefill_equals_one_at_a_time(tiny_pipeline, sources, alone, monkeypatch):
    engine = LLMEngine(tiny_pipeline.loaded, EngineConfig(step_token_budget=WHOLE))
    rec = Recorder(engine, monkeypatch)
    seqs = _run(engine, sources)
    assert rec.calls[0] == [(f"r{i}", 0, s.prompt_len) for i, s in enumerate(sources)], "one forward for all"
    _assert_same(rec, seqs, alone)


@pytest.mark.parametrize("budget", [1, 3, 7, 16, 100])
def test_chunked_prefill_equals_unchunked(tiny_pipeline, sources, alone, monkeypatch, budget):
    """Every prompt over several steps in chunks of at most `budget` rows, sharing the budget with each other
    and with the decode rows of the prompts already done."""
    engine = LLMEngine(tiny_pipeline.loaded, EngineConfig(step_token_budget=budget))
    rec = Recorder(engine, monkeypatch)
    seqs = _run(engine, sources)
    chunks = [c for call in rec.calls for c in call]
    assert all(end - start <= budget for _, start, end in chunks)
    assert max(len(call) for call in rec.calls) > 1 or budget == 1, "chunks of several prompts share a forward"
    prefix = {f"r{i}": s.image.prefix_len for i, s in enumerate(sources) if s.image is not None}
    if budget < 8:  # a chunk boundary strictly inside the blind prefix (8 rows here)
        assert any(0 < start < prefix[rid] for rid, start, _ in chunks if rid in prefix)
    _assert_same(rec, seqs, alone)


def test_chunks_over_fragmented_pages(tiny_pipeline, sources, alone, monkeypatch):
    """Pages forced apart (another holder between every page): each chunk gathers its earlier chunks' K/V."""
    engine = LLMEngine(tiny_pipeline.loaded, EngineConfig(block_size=4, kv_watermark=0.0, step_token_budget=10))
    blocks = engine.kv.blocks
    holes = blocks.allocate(blocks.num_pages)
    blocks.free(holes[::2])  # every other page free: nothing contiguous is left
    rec = Recorder(engine, monkeypatch)
    seqs = [engine.add_request(s, GREEDY, f"r{i}") for i, s in enumerate(sources)]
    while engine.has_work():
        engine.step()
        assert all(s.pages.self_base is None for s in seqs if s.pages is not None and len(s.pages.self_pages) > 1)
    _assert_same(rec, seqs, alone)


def test_running_streams_get_a_token_every_step_while_a_long_prompt_prefills(tiny_pipeline, sources, alone,
                                                                             monkeypatch):
    budget = 16
    engine = LLMEngine(tiny_pipeline.loaded, EngineConfig(step_token_budget=budget))
    rec = Recorder(engine, monkeypatch)
    streams = [engine.add_request(s, SamplingParams(max_tokens=60, ignore_eos=True)) for s in sources[:3]]
    while any(not s.output_ids for s in streams):
        engine.step()
    long_text, long_image = (engine.add_request(sources[i], GREEDY, f"long{i}") for i in (6, 4))
    steps = 0
    while not (long_text.output_ids and long_image.output_ids):
        before = [len(s.output_ids) for s in streams]
        rec.calls.clear()
        engine.step()
        steps += 1
        assert [len(s.output_ids) for s in streams] == [n + 1 for n in before], "a stream missed a step"
        assert sum(end - start for call in rec.calls for _, start, end in call) <= budget - len(streams)
    assert steps >= (sources[6].prompt_len + sources[4].prompt_len) // (budget - len(streams))
    while engine.has_work():
        engine.step()
    _assert_same(rec, [long_text, long_image], alone, which=[6, 4])


def _small_engine(loaded, sources, budget):
    """A pool that holds the streams' and the long text prompt's prompts and a few pages more: the streams'
    growth must preempt the long prompt while it is being prefilled."""
    probe = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**22, block_size=4))
    one = SamplingParams(max_tokens=1)
    need = sum(probe.kv_bytes_for(sources[i], one) for i in (3, 0, 6)) + 4 * probe.kv.blocks.page_bytes
    return LLMEngine(loaded, EngineConfig(kv_budget_bytes=need, block_size=4, kv_watermark=0.0,
                                          step_token_budget=budget))


def test_preempted_mid_prefill_resumes_where_it_stopped(tiny_pipeline, sources, alone, monkeypatch):
    """Streams growing into a small pool swap out the sequence being prefilled (its written rows and cross K/V go
    to the host); it comes back and continues from the same row: every request's tokens are unchanged."""
    engine = _small_engine(tiny_pipeline.loaded, sources, budget=4)
    rec = Recorder(engine, monkeypatch)
    preempted, real_preempt = [], engine.scheduler._preempt

    def preempt(seq):
        preempted.append((seq.request_id, seq.prefilled, seq.prompt_len))
        real_preempt(seq)

    monkeypatch.setattr(engine.scheduler, "_preempt", preempt)
    stream_params = SamplingParams(max_tokens=40, ignore_eos=True)
    a = engine.add_request(sources[3], stream_params, "a")
    b = engine.add_request(sources[0], stream_params, "b")
    engine.step()
    long = [engine.add_request(sources[i], GREEDY, f"long{i}") for i in (6, 4)]
    while engine.has_work():
        engine.step()
        assert engine.stats().kv_used_bytes <= engine.stats().kv_budget_bytes
    mid = [p for p in preempted if 0 < p[1] < p[2]]
    assert mid, f"no sequence was preempted mid-prefill: {preempted}"
    assert {rid for rid, _, _ in mid} <= {"long6", "long4"}
    for s in long:  # its chunks after the swap continue where it stopped: no row twice, none skipped (the first
        # chunk starts after the rows the prefix cache gave it)
        rows = sorted((start, end) for call in rec.calls for rid, start, end in call if rid == s.request_id)
        assert [r[0] for r in rows] == [s.cached_tokens] + [r[1] for r in rows[:-1]] and rows[-1][1] == s.prompt_len
    _assert_same(rec, long, alone, which=[6, 4])
    loaded = tiny_pipeline.loaded
    for seq, src in ((a, sources[3]), (b, sources[0])):
        assert seq.output_ids == LLMEngine(loaded).generate([src], stream_params)[0].output_ids
    assert engine.stats().kv_used_bytes == 0


def test_abort_mid_prefill_frees_its_pages_and_leaves_the_streams_alone(tiny_pipeline, sources):
    loaded = tiny_pipeline.loaded
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    expected = LLMEngine(loaded).generate([sources[1]], params)[0].output_ids
    engine = LLMEngine(loaded, EngineConfig(step_token_budget=8))
    stream = engine.add_request(sources[1], params)
    engine.step()
    held = engine.stats().kv_used_bytes
    long = engine.add_request(sources[4], GREEDY)
    for _ in range(3):
        engine.step()
    assert 0 < long.prefilled < long.prompt_len and engine.stats().kv_used_bytes > held
    engine.abort(long.request_id)
    assert long.finish_reason == "abort" and long.pages is None and engine.stats().kv_used_bytes == held
    while engine.has_work():
        engine.step()
    assert stream.output_ids == expected and engine.stats().kv_used_bytes == 0 and engine.num_requests == 0


def test_n_completions_fork_after_the_last_chunk(tiny_pipeline, sources):
    """n = 3 seeded, prefilled in chunks: no completion before the prompt's last chunk, then all three, each equal
    to a lone unchunked request seeded seed + i."""
    loaded = tiny_pipeline.loaded
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=11, ignore_eos=True)
    whole = EngineConfig(step_token_budget=WHOLE)
    lone = [LLMEngine(loaded, whole).generate([sources[4]], params.model_copy(update={"seed": 11 + i}))[0].output_ids
            for i in range(3)]
    engine = LLMEngine(loaded, EngineConfig(step_token_budget=32))
    seq = engine.add_request(sources[4], params.model_copy(update={"n": 3}))
    first = []
    while not first:
        first = engine.step()
        assert first or (seq.prefilling and not seq.siblings)
    assert [o.index for o in first] == [0, 1, 2] and seq.prefilled == seq.prompt_len
    while engine.has_work():
        engine.step()
    assert [s.output_ids for s in [seq] + seq.siblings] == lone
    assert engine.stats().kv_used_bytes == 0


def test_a_failing_prefill_fails_its_sequence_alone(tiny_pipeline, sources, alone, monkeypatch):
    """A chunk (not its first) that breaks the batched forward fails its sequence; the others, retried alone, are
    unchanged."""
    engine = LLMEngine(tiny_pipeline.loaded, EngineConfig(step_token_budget=64))
    real = engine.runner.prefiller.run

    def run(chunks):
        if any(c.seq.request_id == "r4" and c.start > 0 for c in chunks):
            raise RuntimeError("poisoned chunk")
        return real(chunks)

    monkeypatch.setattr(engine.runner.prefiller, "run", run)
    seqs = [engine.add_request(s, GREEDY, f"r{i}") for i, s in enumerate(sources)]
    finals = {}
    while engine.has_work():
        finals |= {o.request_id: o for o in engine.step() if o.finished}
    assert finals["r4"].finish_reason == "error"
    assert all(s.output_ids == alone[1][i] for i, s in enumerate(seqs) if i != 4)
    assert engine.stats().kv_used_bytes == 0 and engine.num_requests == 0

"""The continuous-batching engine: batched equals alone, seeded sampling, KV budget accounting, streaming."""

import asyncio
import threading
import time

import pytest
import torch

from pipeline.config import EngineConfig, TrimConfig
from pipeline.engine.async_engine import AsyncLLMEngine
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampler import Sampler, SampleRow
from pipeline.engine.sampling import SamplingParams
from pipeline.errors import InvalidRequest, Overloaded
from tests.helpers import PROMPTS


@pytest.fixture(scope="module")
def sources(tiny_pipeline, imgs):
    """Different prompts, images, kept counts and lengths, plus a text-only prompt."""
    pipe = tiny_pipeline
    specs = [
        (PROMPTS[0], ["1tile"], TrimConfig(policy="none")),
        (PROMPTS[1], ["4tile"], TrimConfig(k_ratio=0.1)),
        (PROMPTS[2], ["2tile"], TrimConfig(k_ratio=0.3)),
        (PROMPTS[3], ["4tile"], TrimConfig(policy="none")),
        (PROMPTS[1], ["1tile", "4tile"], TrimConfig(policy="mass", mass=0.4)),
        (PROMPTS[3] + " and then tell me a story about it", [], None),
    ]
    return [pipe.trim(pipe.prepare(p, [imgs[n] for n in names]), cfg) for p, names, cfg in specs]


def _alone(loaded, source, params):
    engine = LLMEngine(loaded)
    (seq,) = engine.generate([source], params)
    return seq.output_ids


def test_batched_equals_alone_with_staggered_arrivals(tiny_pipeline, sources):
    loaded = tiny_pipeline.loaded
    lengths = [12, 5, 9, 16, 7, 11]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    alone = [_alone(loaded, s, p) for s, p in zip(sources, params)]

    engine = LLMEngine(loaded)
    seqs, max_batch = [], 0
    for i, (s, p) in enumerate(zip(sources, params)):
        seqs.append(engine.add_request(s, p))
        for _ in range(i % 3):  # new sequences join between decode steps of the running ones
            engine.step()
            max_batch = max(max_batch, engine.stats().last_batch_size)
    while engine.has_work():
        engine.step()
        max_batch = max(max_batch, engine.stats().last_batch_size)
    assert max_batch >= 4, "sequences must actually share decode steps"
    assert [s.output_ids for s in seqs] == alone
    assert [len(s.output_ids) for s in seqs] == lengths
    assert engine.stats().kv_used_bytes == 0


def test_greedy_alone_equals_hf(tiny_pipeline, sources):
    """Batched == alone above; alone == HF here (the core tests cover more cases)."""
    from pipeline.quality.reference import trim_generated

    model = tiny_pipeline.loaded.model
    ids = torch.tensor(sources[5].prompt_token_ids)
    out = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=10, do_sample=False)
    assert _alone(tiny_pipeline.loaded, sources[5], SamplingParams(max_tokens=10)) == trim_generated(out[0, len(ids):].tolist(), model)


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_pipeline, sources):
    loaded = tiny_pipeline.loaded
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = _alone(loaded, sources[1], params)
    engine = LLMEngine(loaded)
    others = [engine.add_request(s, SamplingParams(max_tokens=8, temperature=1.0, seed=i)) for i, s in enumerate(sources)]
    engine.step()
    target = engine.add_request(sources[1], params)
    while engine.has_work():
        engine.step()
    assert target.output_ids == alone
    assert _alone(loaded, sources[1], params.model_copy(update={"seed": 99})) != alone
    assert len({tuple(o.output_ids) for o in others}) > 1


def _sample_one(logits, params, seed=None, step=0):
    sampler = Sampler(logits.numel(), "cpu", generator=torch.Generator().manual_seed(step))
    return sampler.sample(logits[None], sampler.prepare([SampleRow(params, seed, [], [0] * step)]))[0]


def test_sampler_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    for step in range(50):
        assert _sample_one(logits, SamplingParams(temperature=1.0, top_k=2), step=step).token in (0, 1)
        assert _sample_one(logits, SamplingParams(temperature=1.0, top_p=0.5), step=step).token == 0  # 66% alone
    assert _sample_one(logits, SamplingParams()).token == 0
    lp = _sample_one(logits, SamplingParams(logprobs=True)).logprob
    assert lp == pytest.approx(float(torch.log_softmax(logits, -1)[0]))


def test_stop_strings_stop_ids_and_max_tokens(tiny_pipeline, sources):
    loaded = tiny_pipeline.loaded
    full = LLMEngine(loaded).generate([sources[3]], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert full.finish_reason == "length" and len(full.output_ids) == 16
    stop_tok = full.output_ids[5]
    by_id = LLMEngine(loaded).generate([sources[3]], SamplingParams(max_tokens=16, stop_token_ids=[stop_tok]))[0]
    first = full.output_ids.index(stop_tok)
    assert by_id.finish_reason == "stop" and by_id.output_ids == full.output_ids[: first + 1]
    stop_str = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    by_str = LLMEngine(loaded).generate([sources[3]], SamplingParams(max_tokens=16, stop=[stop_str], ignore_eos=True))[0]
    assert by_str.finish_reason == "stop" and by_str.text == full.text[: full.text.index(stop_str)]


# --- KV budget ---------------------------------------------------------------------------------------

def test_admission_by_budget_never_exceeds_and_frees(tiny_pipeline, sources):
    loaded = tiny_pipeline.loaded
    probe = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**24))
    need = probe.kv_bytes_for(sources[3], SamplingParams(max_tokens=8))
    engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2 * need + need // 2))  # room for two
    seqs = [engine.add_request(sources[3], SamplingParams(max_tokens=8, ignore_eos=True)) for _ in range(5)]
    peak = 0
    while engine.has_work():
        engine.step()
        stats = engine.stats()
        assert stats.kv_used_bytes <= stats.kv_budget_bytes
        assert stats.running <= 2
        peak = max(peak, stats.running)
    assert peak == 2 and all(len(s.output_ids) == 8 for s in seqs)
    assert engine.stats().kv_used_bytes == 0


def test_trimmed_requests_fit_more(tiny_pipeline, imgs):
    pipe = tiny_pipeline
    prepared = pipe.prepare(PROMPTS[1], [imgs["4tile"]])
    full, cut = pipe.trim(prepared, TrimConfig(policy="none")), pipe.trim(prepared, TrimConfig(k_ratio=0.05))
    engine = LLMEngine(pipe.loaded, EngineConfig(kv_budget_bytes=2**20))
    count = {}
    for name, src in (("full", full), ("cut", cut)):
        seqs = [engine.add_request(src, SamplingParams(max_tokens=4)) for _ in range(30)]
        count[name] = engine.count_admissible()
        for s in seqs:
            engine.abort(s.request_id)
        assert engine.stats().kv_used_bytes == 0
    assert count["cut"] > count["full"] >= 1


def test_refusals(tiny_pipeline, sources):
    loaded = tiny_pipeline.loaded
    small = LLMEngine(loaded, EngineConfig(kv_budget_bytes=4096))
    with pytest.raises(InvalidRequest, match="whole budget"):
        small.add_request(sources[3], SamplingParams(max_tokens=4))
    short = LLMEngine(loaded, EngineConfig(max_model_len=40))
    with pytest.raises(InvalidRequest, match="max_model_len"):
        short.add_request(sources[3], SamplingParams(max_tokens=30))
    queued = LLMEngine(loaded, EngineConfig(max_waiting=2))
    queued.add_request(sources[0], SamplingParams())
    queued.add_request(sources[0], SamplingParams())
    with pytest.raises(Overloaded):
        queued.add_request(sources[0], SamplingParams())


def test_abort_frees_kv_at_once(tiny_pipeline, sources):
    engine = LLMEngine(tiny_pipeline.loaded)
    a = engine.add_request(sources[1], SamplingParams(max_tokens=50, ignore_eos=True))
    b = engine.add_request(sources[2], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    used = engine.stats().kv_used_bytes
    engine.abort(a.request_id)
    assert 0 < engine.stats().kv_used_bytes < used and a.finish_reason == "abort"
    engine.abort(b.request_id)
    assert engine.stats().kv_used_bytes == 0 and not engine.has_work()


# --- async streaming -----------------------------------------------------------------------------------

def test_streaming_deltas_and_cancel(tiny_pipeline, sources):
    loaded = tiny_pipeline.loaded
    expected = LLMEngine(loaded).generate([sources[1]], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    aeng = AsyncLLMEngine(LLMEngine(loaded))

    async def run():
        text, ids = "", []
        async for out in aeng.generate(sources[1], SamplingParams(max_tokens=10, ignore_eos=True)):
            text += out.new_text
            ids += out.new_token_ids
        assert ids == expected.output_ids and text == expected.text

        async def consume_two():
            n = 0
            async for _ in aeng.generate(sources[2], SamplingParams(max_tokens=200, ignore_eos=True)):
                n += 1
                if n == 2:
                    return  # the client went away
        await asyncio.gather(*(consume_two() for _ in range(3)))
        for _ in range(100):
            if aeng.stats().kv_used_bytes == 0 and aeng.stats().running == 0:
                break
            await asyncio.sleep(0.05)
        assert aeng.stats().kv_used_bytes == 0 and aeng.stats().running == 0

    try:
        asyncio.run(run())
    finally:
        aeng.shutdown()


def test_text_is_made_off_the_step(tiny_pipeline, sources, monkeypatch):
    """step_tokens() never detokenizes; the async engine detokenizes only off its step thread, and a stop string
    found there ends the stream at the token and text the synchronous step() gives, and frees the KV."""
    loaded = tiny_pipeline.loaded
    full = LLMEngine(loaded).generate([sources[3]], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    stop_str = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    params = SamplingParams(max_tokens=16, stop=[stop_str], ignore_eos=True)
    (sync,) = LLMEngine(loaded).generate([sources[3]], params)
    assert sync.finish_reason == "stop" and len(sync.output_ids) < 16
    tok, threads = loaded.processor.tokenizer, []
    real_decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda *a, **k: threads.append(threading.current_thread().name)
                        or real_decode(*a, **k))
    raw = LLMEngine(loaded)
    raw.add_request(sources[3], params)
    tokens = []
    while raw.has_work():
        tokens += raw.step_tokens()
    assert threads == [] and [t.token_ids[0] for t in tokens] == full.output_ids  # no text, so no stop string
    aeng = AsyncLLMEngine(LLMEngine(loaded))

    async def run():
        outs = [o async for o in aeng.generate(sources[3], params)]
        for _ in range(100):
            if aeng.stats().kv_used_bytes == 0:
                break
            await asyncio.sleep(0.05)
        return outs

    try:
        outs = asyncio.run(run())
    finally:
        aeng.shutdown()
    assert [t for o in outs for t in o.new_token_ids] == sync.output_ids
    assert "".join(o.new_text for o in outs) == sync.text and outs[-1].finish_reason == "stop"
    assert threads and "crosstrim-engine" not in threads
    assert aeng.stats().kv_used_bytes == 0 and aeng.engine.num_requests == 0


def test_async_engine_fails_requests_not_the_replica(tiny_pipeline, sources, monkeypatch):
    aeng = AsyncLLMEngine(LLMEngine(tiny_pipeline.loaded))
    boom = {"n": 0}
    real_decode = aeng.engine.runner.decode

    def flaky(seqs):
        boom["n"] += 1
        if boom["n"] in (2, 3):  # the batched forward and its retry alone
            raise RuntimeError("injected")
        return real_decode(seqs)

    monkeypatch.setattr(aeng.engine.runner, "decode", flaky)

    async def run():
        outs = [o async for o in aeng.generate(sources[1], SamplingParams(max_tokens=20, ignore_eos=True))]
        assert outs[-1].finish_reason == "error" and outs[-1].error == "RuntimeError"
        assert aeng.stats().kv_used_bytes == 0
        outs = [o async for o in aeng.generate(sources[0], SamplingParams(max_tokens=3, ignore_eos=True))]
        assert outs[-1].finished and outs[-1].completion_tokens == 3

    try:
        asyncio.run(run())
    finally:
        aeng.shutdown()


# --- isolation: one request's failure is that request's alone --------------------------------------------

@pytest.mark.parametrize("bad", [dict(seed=2**64), dict(seed=-(2**63) - 1), dict(temperature=1e-300),
                                 dict(temperature=1e-40), dict(top_p=5e-324)])
def test_sampling_params_refuse_what_the_sampler_cannot_compute(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_sampling_at_the_floors_works():
    logits = torch.randn(50) * 30
    for params in (SamplingParams(temperature=1e-5, seed=2**64 - 1), SamplingParams(temperature=1.0, top_p=1e-6,
                                                                                      seed=-(2**63))):
        assert _sample_one(logits, params, seed=params.seed).token == int(torch.argmax(logits))


def test_one_failing_sequence_leaves_the_batch_alone(tiny_pipeline, sources, monkeypatch):
    """A sequence whose sampling raises, and one that poisons the batched forward, each fail alone; the others
    give exactly their tokens decoded alone, and the KV is all freed."""
    loaded = tiny_pipeline.loaded
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    alone = [_alone(loaded, s, params) for s in sources[:4]]
    engine = LLMEngine(loaded)
    seqs = [engine.add_request(s, params, f"r{i}") for i, s in enumerate(sources[:4])]
    real_decode, real_append = engine.runner.decode, engine._append

    def decode(batch):  # r1 poisons any forward it is in, once it has a token
        if any(s.request_id == "r1" for s in batch):
            raise RuntimeError("poisoned forward")
        return real_decode(batch)

    def append(seq, logits):
        if seq.request_id == "r2" and seq.output_ids:
            raise FloatingPointError("bad sample")
        return real_append(seq, logits)

    monkeypatch.setattr(engine.runner, "decode", decode)
    monkeypatch.setattr(engine, "_append", append)
    finals = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["r1"].finish_reason == "error" and finals["r2"].finish_reason == "error"
    for i in (0, 3):
        assert finals[f"r{i}"].finish_reason == "length" and seqs[i].output_ids == alone[i]
    assert engine.stats().kv_used_bytes == 0 and engine.num_requests == 0


# --- admission with n > 1, a dead step loop, stats read across threads ----------------------------------------

def test_a_request_that_could_never_be_admitted_is_refused_at_once(tiny_pipeline, sources):
    """n worst cases beyond the pool plus the swap space (less the largest): refused by add_request, not left
    waiting forever; n = 2 of the same fits and runs; count_admissible is the real admission's count."""
    loaded, src = tiny_pipeline.loaded, sources[1]
    probe = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**20))
    one = probe.kv_bytes_for(src, SamplingParams(max_tokens=40))
    engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2 * one + one // 2, swap_budget_bytes=64 * 1024))
    with pytest.raises(InvalidRequest, match="n=8 completions"):
        engine.add_request(src, SamplingParams(max_tokens=40, n=8))
    assert engine.kv_bytes_for(src, SamplingParams(max_tokens=40, n=8)) == 8 * one
    assert not engine.has_work()
    seqs = [engine.add_request(src, SamplingParams(max_tokens=40, n=2, ignore_eos=True)) for _ in range(3)]
    assert engine.count_admissible() == 1  # two worst cases fit the pool, four do not
    admitted = 0
    while engine.scheduler.admit_next() is not None:
        admitted += 1
    assert admitted == 1
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < 2000, "a request waits forever"
    assert all(len(s.output_ids) == 40 and len(s.siblings[0].output_ids) == 40 for s in seqs)


def test_count_admissible_is_admit_next_dry_run(tiny_pipeline, sources):
    """Mixed n, images and lengths, with running, waiting and preempted sequences: the dry run counts what the real
    admission then takes, step after step."""
    loaded = tiny_pipeline.loaded
    probe = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**20, block_size=4))
    one = max(probe.kv_bytes_for(s, SamplingParams(max_tokens=24)) for s in sources)
    engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=3 * one, block_size=4, max_running=10,
                                            swap_budget_bytes=4 * one))
    for i in range(14):
        engine.add_request(sources[i % len(sources)], SamplingParams(max_tokens=24 - i, n=1 + i % 4, ignore_eos=True,
                                                                     temperature=1.0, seed=i))
    checked = 0
    while engine.has_work():
        sched = engine.scheduler
        expected = sched.count_admissible()
        waiting = len(sched.waiting)
        while sched.admit_next() is not None:
            pass
        assert waiting - len(sched.waiting) == expected
        checked += expected > 0
        engine.step()
        assert sched.running_slots() <= 10
    assert checked >= 3 and engine.stats().kv_used_bytes == 0 and engine.scheduler.swap.committed == 0


class _SwitchingList(list):
    """A list whose iteration lets other threads run between taking an item and handing it over, as a thread
    switch may at any bytecode: a race on what is iterated shows at once instead of once in a million reads."""

    def __iter__(self):
        for item in list.__iter__(self):
            time.sleep(0.0002)
            yield item


def test_stats_read_while_the_engine_steps(tiny_pipeline, sources):
    """A thread reads stats while the step thread preempts and finishes sequences (seq.pages = None): what it reads
    is a snapshot the step thread publishes, never an iteration of the running list (which raised AttributeError
    when a sequence finished between being taken from the list and its pages being read)."""
    loaded = tiny_pipeline.loaded
    probe = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**20, block_size=4))
    one = max(probe.kv_bytes_for(s, SamplingParams(max_tokens=12)) for s in sources)
    engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2 * one, block_size=4, kv_watermark=0.0))
    engine.scheduler.running = _SwitchingList()
    aeng = AsyncLLMEngine(engine)
    errors, reads, done = [], [0], threading.Event()

    def reader():
        while not done.is_set():
            try:
                st = aeng.stats()
                assert 0 <= st.kv_written_bytes <= st.kv_used_bytes
            except Exception as exc:  # noqa: BLE001 - what the race raised
                errors.append(exc)
            reads[0] += 1
            time.sleep(0.001)  # a reader that never sleeps starves the step thread of the GIL (minutes on 2 cores)

    async def run():
        return await asyncio.gather(*(_drain(aeng.generate(sources[i % 6], SamplingParams(
            max_tokens=12 - i % 5, ignore_eos=True))) for i in range(16)))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        tokens = asyncio.run(run())
    finally:
        done.set()
        thread.join()
        aeng.shutdown()
    assert errors == [] and reads[0] > 100, (errors[:3], reads)
    assert tokens == [12 - i % 5 for i in range(16)]


async def _drain(stream) -> int:
    """Consume a stream; its completion tokens."""
    tokens = 0
    async for out in stream:
        tokens = out.completion_tokens
    return tokens


def test_a_dead_step_loop_fails_its_streams_and_says_so(tiny_pipeline, sources, monkeypatch):
    """An error escaping the step loop (a step raises, and failing its requests raises too, as a scheduler left
    inconsistent did: ValueError from list.remove) ends every stream, running or waiting, with EngineDead at once;
    check_health raises; a new request is refused. They hung forever once, the loop gone and /health 200."""
    from pipeline.errors import EngineDead

    aeng = AsyncLLMEngine(LLMEngine(tiny_pipeline.loaded, EngineConfig(max_running=2)))

    async def run():
        producing = asyncio.Event()

        async def stream(i):
            async for _ in aeng.generate(sources[i], SamplingParams(max_tokens=2000 - sources[i].prompt_len,
                                                                    ignore_eos=True)):
                producing.set()

        jobs = [asyncio.ensure_future(stream(i)) for i in range(4)]  # two run, two wait
        await asyncio.wait_for(producing.wait(), 120)
        aeng.check_health()  # alive and well
        t0 = time.monotonic()

        def broken(*_):
            raise ValueError("list.remove(x): x not in list")

        monkeypatch.setattr(aeng.engine, "fail_all", broken)
        monkeypatch.setattr(aeng.engine, "step_tokens", lambda: broken())
        results = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 30)
        ended_in = time.monotonic() - t0
        with pytest.raises(EngineDead):
            await _drain(aeng.generate(sources[0], SamplingParams(max_tokens=2)))
        return results, ended_in

    try:
        results, ended_in = asyncio.run(run())
    finally:
        aeng.shutdown()
    assert all(isinstance(r, EngineDead) and "ValueError: list.remove" in str(r) for r in results), results
    assert ended_in < 10
    with pytest.raises(EngineDead):
        aeng.check_health()
    assert aeng.queue_room() == 0


def test_generate_acks_once_the_engine_counts_the_request(tiny_pipeline, sources):
    """With `ack`, generate yields None first, by when the engine's queue_room no longer offers the request's place:
    what the decoder sends as Queued, after which the ingress's admission gives its own place back (at the next
    report). Here the request waits behind a running one (max_running 1), so the count is still visible."""
    aeng = AsyncLLMEngine(LLMEngine(tiny_pipeline.loaded, EngineConfig(max_running=1, max_waiting=4)))

    async def run():
        long = aeng.generate(sources[2], SamplingParams(max_tokens=200, ignore_eos=True))
        await anext(long)  # running: it holds the only running slot
        room = aeng.queue_room()
        queued = aeng.generate(sources[1], SamplingParams(max_tokens=3, ignore_eos=True), ack=True)
        assert await anext(queued) is None
        assert aeng.queue_room() == room - 1  # counted (pending or waiting) from the ack on
        await long.aclose()  # the running one goes: the queued one runs
        out = await asyncio.wait_for(anext(queued), 60)
        assert out is not None and out.new_token_ids
        await queued.aclose()

    try:
        asyncio.run(run())
    finally:
        aeng.shutdown()

"""The batched sampler against a per-row reference written from the definitions (OpenAI's presence/frequency
penalties and logit_bias, HF/vLLM's repetition_penalty, vLLM's min_tokens / min_p, HF's top-k / top-p), its
seeded draws independent of the batch, greedy == argmax, raw logprobs, the token-bitmask hook and one host read."""

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.engine import sampler as sampler_module
from pipeline.engine.sampler import Sampler, SampleRow, seeded_uniform
from pipeline.engine.sampling import SamplingParams
from pipeline.engine.token_mask import (
    allocate_bitmask,
    apply_token_bitmask,
    unpack_bitmask,
)
from pipeline.errors import InvalidRequest
from pipeline.types import DecodeRequest

V, EOS = 64, 5


# ---- the reference: one row at a time, float64, loops over tokens ---------------------------------------------

def ref_process(logits, p: SamplingParams, prompt, output, allowed=None, eos=(EOS,)):
    x = logits.double().tolist()
    if allowed is not None:
        x = [v if allowed[t] else -math.inf for t, v in enumerate(x)]
    if len(output) < p.min_tokens:
        for t in p.stop_token_ids + ([] if p.ignore_eos else list(eos)):
            x[t] = -math.inf
    for t, b in p.logit_bias.items():
        x[t] += b
    counts, seen = Counter(output), set(prompt) | set(output)  # prompt ids past the vocabulary (an image) ignored
    for t in range(len(x)):
        if t in seen:  # HF's RepetitionPenaltyLogitsProcessor: divide a positive logit, multiply a negative one
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)  # OpenAI's formula
    return x


def ref_softmax(x):
    m = max(x)
    e = [math.exp(v - m) if v > -math.inf else 0.0 for v in x]
    return [v / sum(e) for v in e]


def ref_distribution(x, p: SamplingParams):
    """Normalised probabilities a non-greedy row draws from."""
    x = [v / p.temperature for v in x]
    order = sorted(range(len(x)), key=lambda t: -x[t])
    if 0 < p.top_k < len(x):
        kth = x[order[p.top_k - 1]]
        x = [v if v >= kth else -math.inf for v in x]
    if p.top_p < 1.0:
        probs, kept, mass = ref_softmax(x), set(), 0.0
        for t in order:
            if mass >= p.top_p and kept:
                break
            kept.add(t)
            mass += probs[t]
        x = [v if t in kept else -math.inf for t, v in enumerate(x)]
    probs = ref_softmax(x)
    if p.min_p:
        probs = [q if q >= p.min_p * max(probs) else 0.0 for q in probs]
    return [q / sum(probs) for q in probs]


def ref_token(probs, u):
    """Inverse CDF: the first token whose cumulative probability exceeds u."""
    cum = 0.0
    for t, q in enumerate(probs):
        cum += q
        if q > 0 and cum > u:
            return t
    return max(t for t, q in enumerate(probs) if q > 0)


# ---- fixtures ----------------------------------------------------------------------------------------------

def make_sampler(seed=0, vocab=V):
    return Sampler(vocab, "cpu", [EOS], generator=torch.Generator().manual_seed(seed))


def row(params, seed=None, prompt=(), output=()):
    return SampleRow(params, seed, list(prompt), list(output))


g = torch.Generator().manual_seed(1234)
PROMPT = torch.randint(0, V, (20,), generator=g).tolist()
OUTPUT = torch.randint(0, V, (12,), generator=g).tolist() + [7, 7, 7, 9]
T1 = {"temperature": 1.0}
FIELDS = {  # each field alone (sampled at temperature 1 so the distribution shows it), and together
    "temperature": {"temperature": 0.4},
    "top_k": {**T1, "top_k": 5},
    "top_p": {**T1, "top_p": 0.6},
    "min_p": {**T1, "min_p": 0.2},
    "presence_penalty": {**T1, "presence_penalty": 1.5},
    "negative_presence": {**T1, "presence_penalty": -1.0},
    "frequency_penalty": {**T1, "frequency_penalty": 0.7},
    "repetition_penalty": {**T1, "repetition_penalty": 1.8},
    "repetition_below_1": {**T1, "repetition_penalty": 0.6},
    "logit_bias": {**T1, "logit_bias": {3: 4.0, 11: -100.0, 40: 2.5}},
    "min_tokens": {**T1, "max_tokens": 64, "min_tokens": 30, "stop_token_ids": [8, 9]},
    "min_tokens_ignore_eos": {**T1, "max_tokens": 64, "min_tokens": 30, "ignore_eos": True, "stop_token_ids": [8]},
    "all": {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "presence_penalty": 0.5,
            "frequency_penalty": 0.3, "repetition_penalty": 1.2, "logit_bias": {3: 2.0}, "max_tokens": 64,
            "min_tokens": 40, "stop_token_ids": [8]},
}


def logits_batch(n, seed=0, scale=3.0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


# ---- each field as its definition says ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FIELDS))
def test_each_field_gives_the_reference_distribution(name):
    """In a batch mixing every field (rows differ), each row's processed logits and distribution equal the
    per-row reference; and the field changes the distribution (the case is not vacuous)."""
    names = list(FIELDS)
    params = [SamplingParams(**FIELDS[n]) for n in names]
    logits = logits_batch(len(names), seed=3)
    logits[:, [EOS, 8, 9]] = logits.amax(-1, keepdim=True).expand(-1, 3) + 1  # likely stop tokens: suppressing shows
    sampler = make_sampler()
    batch = sampler.prepare([row(p, prompt=PROMPT, output=OUTPUT) for p in params])
    x = sampler.process(logits, batch)
    probs = sampler.distribution(x, batch)
    i, p = names.index(name), params[names.index(name)]
    want_x = torch.tensor(ref_process(logits[i], p, PROMPT, OUTPUT), dtype=torch.float32)
    torch.testing.assert_close(x[i], want_x, rtol=1e-5, atol=1e-5)
    want = torch.tensor(ref_distribution(ref_process(logits[i], p, PROMPT, OUTPUT), p), dtype=torch.float32)
    torch.testing.assert_close(probs[i] / probs[i].sum(), want, rtol=1e-4, atol=1e-6)
    plain = torch.tensor(ref_distribution(logits[i].double().tolist(), SamplingParams(**T1)), dtype=torch.float32)
    changed = (want - plain).abs() > 0.05 * plain + 1e-9  # some token's probability moves by 5% or more
    assert changed.any(), f"{name} must change the distribution for this test to mean anything"


def test_top_p_over_top_k_candidates_is_the_reference():
    """Rows that all set top_k order only their top-k candidates for top_p (no full sort): the same distribution
    as the reference, ties at the k-th included (a tie past the candidates follows them)."""
    params = [SamplingParams(temperature=0.9, top_k=k, top_p=q) for k, q in ((5, 0.5), (20, 0.9), (3, 0.99), (8, 1.0))]
    logits = logits_batch(4, seed=8)
    logits[2, :6] = logits[2].amax() + 1  # six tied at the top: top_k=3 keeps all six
    sampler = make_sampler()
    batch = sampler.prepare([row(p) for p in params])
    assert batch.top_p_candidates == 20
    probs = sampler.distribution(sampler.process(logits, batch), batch)
    for i, p in enumerate(params):
        want = torch.tensor(ref_distribution(logits[i].double().tolist(), p), dtype=torch.float32)
        torch.testing.assert_close(probs[i] / probs[i].sum(), want, rtol=1e-4, atol=1e-6)
    assert int((probs[2] > 0).sum()) == 6


def test_field_directions():
    """Spot checks of what the definitions imply, on the sampler alone."""
    logits = torch.zeros(1, V)
    logits[0, 7], logits[0, 9], logits[0, 1] = 2.0, -2.0, 1.0
    sampler = make_sampler()

    def proc(**kw):
        return sampler.process(logits, sampler.prepare([row(SamplingParams(**kw), prompt=[1, V + 3], output=[7, 7, 9])]))[0]

    rep = proc(repetition_penalty=2.0)
    assert rep[7] == 1.0 and rep[9] == -4.0 and rep[1] == 0.5 and rep[2] == 0.0  # prompt tokens count too
    freq = proc(frequency_penalty=0.5)
    assert freq[7] == 1.0 and freq[9] == -2.5 and freq[1] == 1.0  # count x penalty, output tokens only
    pres = proc(presence_penalty=0.5)
    assert pres[7] == 1.5 and pres[9] == -2.5 and pres[1] == 1.0  # once per token present
    banned = proc(min_tokens=4, stop_token_ids=[7])
    assert banned[7] == banned[EOS] == -math.inf and banned[1] == 1.0  # 3 generated < 4
    assert proc(min_tokens=3, stop_token_ids=[7])[7] == 2.0  # reached: nothing suppressed
    assert proc(logit_bias={2: -100.0})[2] == -100.0


def test_defaults_change_nothing():
    logits = logits_batch(8, seed=5)
    sampler = make_sampler()
    batch = sampler.prepare([row(SamplingParams(temperature=1.0), output=OUTPUT) for _ in range(8)])
    x = sampler.process(logits, batch)
    assert torch.equal(x, logits)
    assert batch.penalties is batch.bias is batch.banned is batch.top_k is batch.top_p is batch.min_p is None
    torch.testing.assert_close(sampler.distribution(x, batch), logits.softmax(-1))


def test_seeded_draws_are_the_reference_inverse_cdf():
    """A seeded row's token is the reference's inverse CDF at seeded_uniform(seed, step), for every field."""
    sampler = make_sampler()
    for step in range(40):
        names = list(FIELDS)
        params = [SamplingParams(**FIELDS[n]) for n in names]
        out = OUTPUT[: step % len(OUTPUT)]
        logits = logits_batch(len(names), seed=100 + step, scale=2.0)
        seeds = [1000 * step + i for i in range(len(names))]
        got = sampler.sample(logits, sampler.prepare([row(p, s, PROMPT, out) for p, s in zip(params, seeds)]))
        for i, (p, s) in enumerate(zip(params, seeds)):
            probs = ref_distribution(ref_process(logits[i], p, PROMPT, out), p)
            assert got[i].token == ref_token(probs, seeded_uniform(s, len(out))), (names[i], step)


def test_unseeded_draws_follow_the_distribution():
    """4,000 unseeded rows of one distribution in one batch: each token's frequency within 5 sigma of its
    probability, and filtered-out tokens never drawn."""
    n, p = 4000, SamplingParams(temperature=0.7, top_k=12, top_p=0.95)
    logits = logits_batch(1, seed=9, scale=1.5).expand(n, V)
    sampler = make_sampler(seed=4)
    tokens = [s.token for s in sampler.sample(logits, sampler.prepare([row(p)] * n))]
    probs = ref_distribution(logits[0].double().tolist(), p)
    counts = Counter(tokens)
    for t, q in enumerate(probs):
        assert abs(counts[t] - n * q) <= 5 * math.sqrt(n * q * (1 - q)) + 1, (t, counts[t], n * q)
        assert q > 0 or counts[t] == 0


def test_seeded_rows_identical_whatever_the_batch():
    """The same seeded rows alone (batch 1) and among changing companions (greedy, penalties, masks, other
    seeds, unseeded) at changing positions give identical tokens and logprobs, step after step."""
    targets = [SamplingParams(temperature=0.9, top_p=0.9, top_k=30, seed=77, logprobs=True, top_logprobs=2),
               SamplingParams(temperature=1.3, min_p=0.05, frequency_penalty=0.4, seed=2**64 - 1, logprobs=True)]
    companions = [SamplingParams(), SamplingParams(temperature=1.0, repetition_penalty=1.5),
                  SamplingParams(temperature=0.5, top_k=3, seed=5), SamplingParams(temperature=2.0, top_p=0.3),
                  SamplingParams(temperature=1.0, max_tokens=64, min_tokens=50, logit_bias={1: 9.0}, logprobs=True,
                                 top_logprobs=5)]
    outputs = [[], []]
    for step in range(30):
        logits = logits_batch(2, seed=step)
        alone = []
        for i in range(2):
            one = make_sampler(seed=step)
            alone += one.sample(logits[i : i + 1], one.prepare([row(targets[i], targets[i].seed, PROMPT, outputs[i])]))
        g = torch.Generator().manual_seed(50 + step)
        k = int(torch.randint(0, 40, (), generator=g))
        others = [companions[i % len(companions)] for i in torch.randint(0, 99, (k,), generator=g).tolist()]
        rows = [row(p, p.seed, PROMPT, OUTPUT) for p in others]
        at = sorted(torch.randperm(k + 2, generator=g)[:2].tolist())
        big = logits_batch(k + 2, seed=1000 + step)
        for pos, i in zip(at, (0, 1)):
            rows.insert(pos, row(targets[i], targets[i].seed, PROMPT, outputs[i]))
            big[pos] = logits[i]
        mask = allocate_bitmask(k + 2, V)
        mask[[j for j in range(k + 2) if j not in at], 0] = 0  # companions may not emit tokens 0..31
        sampler = make_sampler(seed=999 + step)
        got = sampler.sample(big, sampler.prepare(rows, mask))
        assert [got[j] for j in at] == alone, step
        assert all(s.token >= 32 for j, s in enumerate(got) if j not in at)
        for i in (0, 1):
            outputs[i].append(alone[i].token)
    assert len(set(outputs[0])) > 5, "the seeded row must actually sample"


# ---- greedy, logprobs, the mask --------------------------------------------------------------------------------

def test_greedy_rows_are_exactly_argmax():
    logits = logits_batch(64, seed=11)
    logits[::4, 10] = logits[::4, 20] = logits[::4].amax(-1) + 1  # ties: the first index, as torch and HF
    sampler = make_sampler()
    got = sampler.sample(logits, sampler.prepare([row(SamplingParams())] * 64))
    assert [s.token for s in got] == logits.argmax(-1).tolist()
    assert all(s.token == 10 for s in got[::4])
    mixed = [row(SamplingParams() if i % 2 else SamplingParams(temperature=2.0, seed=i)) for i in range(64)]
    got = sampler.sample(logits, sampler.prepare(mixed))
    assert [s.token for s in got[1::2]] == logits[1::2].argmax(-1).tolist()


def test_logprobs_are_the_raw_log_softmax():
    """Logprobs and top_logprobs are the model's distribution whatever the filters and penalties (OpenAI's), each
    row with its own top_logprobs count, in one pass."""
    specs = [{"logprobs": True, "top_logprobs": 3}, {"logprobs": True}, {"top_logprobs": 0},
             {**FIELDS["all"], "logprobs": True, "top_logprobs": 5}, {**T1, "logprobs": True, "top_logprobs": 1, "seed": 3}]
    params = [SamplingParams(**s) for s in specs]
    logits = logits_batch(len(params), seed=21)
    sampler = make_sampler()
    got = sampler.sample(logits, sampler.prepare([row(p, p.seed, PROMPT, OUTPUT) for p in params]))
    raw = torch.log_softmax(logits, -1)
    for i, (p, s) in enumerate(zip(params, got)):
        if not p.logprobs:
            assert s.logprob == 0.0 and s.top_logprobs == []
            continue
        assert s.logprob == pytest.approx(float(raw[i, s.token]), abs=1e-6)
        top = raw[i].topk(p.top_logprobs)
        assert [t for t, _ in s.top_logprobs] == top.indices.tolist()
        assert [v for _, v in s.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_bitmask_hook():
    """The bitmask (xgrammar's layout) confines each masked row to its allowed tokens, greedy or sampled;
    unmasked rows are unaffected; a row with nothing allowed is None and alone."""
    B = 6
    logits = logits_batch(B, seed=31)
    allowed = torch.rand(B, V, generator=torch.Generator().manual_seed(2)) < 0.3
    allowed[:, 0] = True
    bitmask = allocate_bitmask(B, V)
    for b in range(B):
        for w in range(bitmask.shape[1]):
            word = sum(1 << j for j in range(32) if w * 32 + j < V and allowed[b, w * 32 + j])
            bitmask[b, w] = word - 2**32 if word >= 2**31 else word
    assert torch.equal(unpack_bitmask(bitmask, V), allowed)
    bitmask[1] = -1  # row 1 unconstrained
    bitmask[4] = 0  # row 4: nothing allowed
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=3.0), SamplingParams(), SamplingParams(temperature=1.0)]
    sampler = make_sampler()
    for step in range(20):
        got = sampler.sample(logits, sampler.prepare([row(p, p.seed, output=[0] * step) for p in params], bitmask))
        assert got[0].token == int(logits[0].masked_fill(~allowed[0], -math.inf).argmax())
        assert got[1].token == int(logits[1].argmax())
        assert all(allowed[b, got[b].token] for b in (2, 3, 5))
        assert got[4] is None
    x = logits.clone()
    apply_token_bitmask(x, bitmask)
    assert torch.equal(torch.isinf(x), ~unpack_bitmask(bitmask, V))
    import xgrammar  # a dependency (structured output): never skipped

    y = logits.clone()
    xgrammar.apply_token_bitmask_inplace(y, bitmask)
    assert torch.equal(x, y), "the same contract as xgrammar's kernel"
    xgr = Sampler(V, "cpu", [EOS], apply_bitmask=xgrammar.apply_token_bitmask_inplace)
    assert xgr.sample(logits[:2], xgr.prepare([row(p) for p in params[:2]], bitmask[:2]))[0].token == got[0].token


# ---- one host read ------------------------------------------------------------------------------------------

class HostReads(TorchDispatchMode):
    """Counts ops that read a tensor's value into Python (a device sync on a GPU)."""

    READS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "allclose"})

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def count_host_reads(monkeypatch):
    """(dispatch mode, Python-level conversions): tolist / cpu / item / numpy calls on tensors."""
    calls = []
    for name in ("tolist", "cpu", "item", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k: calls.append(_n) or _r(self, *a, **k))
    return HostReads(), calls


def test_one_host_read_per_step(monkeypatch):
    """prepare + sample for 32 rows using every feature: one .cpu().tolist() of the packed result, no scalar read."""
    names = list(FIELDS)
    params = [SamplingParams(**FIELDS[names[i % len(names)]], seed=i if i % 3 else None, logprobs=bool(i % 2),
                             top_logprobs=i % 4 if i % 2 else 0) for i in range(32)]
    logits = logits_batch(32, seed=41)
    sampler = make_sampler()
    bitmask = allocate_bitmask(32, V)
    bitmask[::5, 1] = 0
    mode, calls = count_host_reads(monkeypatch)
    with mode:
        got = sampler.sample(logits, sampler.prepare([row(p, p.seed, PROMPT, OUTPUT) for p in params], bitmask))
    assert mode.reads == [] and calls == ["cpu", "tolist"]
    assert len(got) == 32 and all(s is not None for s in got)


def test_engine_samples_each_step_with_one_read(tiny_pipeline, monkeypatch):
    """Prefill rows (n = 2) and decode rows of one step go through one sampler call and one host read."""
    from pipeline.engine.llm_engine import LLMEngine

    ids = tiny_pipeline.prepare("count to ten", []).input_ids.tolist()
    engine = LLMEngine(tiny_pipeline.loaded)
    engine.add_request(DecodeRequest(ids), SamplingParams(max_tokens=6, ignore_eos=True))
    engine.step()
    reads, calls = [], []
    real_read, real_sample = sampler_module.read_host, engine.sampler.sample
    monkeypatch.setattr(sampler_module, "read_host", lambda t: reads.append(t.shape) or real_read(t))
    monkeypatch.setattr(engine.sampler, "sample", lambda x, b: calls.append(x.shape[0]) or real_sample(x, b))
    engine.add_request(DecodeRequest(ids), SamplingParams(max_tokens=4, temperature=1.0, seed=3, n=2, ignore_eos=True,
                                           logprobs=True, top_logprobs=2))
    sizes = []
    while engine.has_work():
        reads.clear()
        calls.clear()
        engine.step()
        assert len(reads) == 1 and len(calls) == 1
        sizes += calls
    assert sizes[0] == 3, "the first step sampled the running row and both prefilled completions at once"


# ---- parameters -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3), ("min_p", 1.5),
                                         ("repetition_penalty", 0.0), ("top_k", -2), ("min_tokens", -1),
                                         ("logit_bias", {5: 101}), ("logit_bias", {-1: 1}), ("stop_token_ids", [-3]),
                                         ("presence_penalty", float("nan")), ("repetition_penalty", float("inf"))])
def test_bad_sampling_fields_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_within_max_and_vocab_checked():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(InvalidRequest, match="logit_bias"):
        SamplingParams(logit_bias={"70": 1.0}).check_vocab(V)  # JSON keys arrive as strings
    assert SamplingParams(top_k=-1).top_k == -1  # vLLM's "off"
    assert SamplingParams(logit_bias={"3": 1}).logit_bias == {3: 1.0}


# ---- end to end on the model -----------------------------------------------------------------------------------

def _reference_generate(model, prompt, p: SamplingParams, seed, eos):
    """HF's logits for the whole sequence each step, the reference processing, argmax or the seeded inverse CDF;
    stops as the engine does (a stop token is kept in output_ids; not before min_tokens, which suppresses it)."""
    out = []
    while len(out) < p.max_tokens:
        ids = torch.tensor([prompt + out])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
        x = ref_process(logits, p, prompt, out, eos=eos)
        if p.greedy:
            token = max(range(len(x)), key=lambda t: (x[t], -t))
        else:
            token = ref_token(ref_distribution(x, p), seeded_uniform(seed, len(out)))
        out.append(token)
        if token in p.stop_token_ids or (token in eos and not p.ignore_eos):
            break
    return out


def test_engine_tokens_follow_the_reference_on_the_models_logits(tiny_pipeline):
    """The engine's tokens for penalised, biased, min_tokens and seeded n = 2 requests, batched together, equal a
    reference loop over HF's logits with the per-row reference above; and each case differs from plain greedy."""
    from pipeline.engine.llm_engine import LLMEngine

    loaded = tiny_pipeline.loaded
    prompt = tiny_pipeline.prepare("tell me a story about a red square and a blue circle", []).input_ids.tolist()
    eos = list(loaded.eos_token_ids)
    plain = _reference_generate(loaded.model, prompt, SamplingParams(max_tokens=12, ignore_eos=True), None, eos)
    cases = [
        SamplingParams(max_tokens=12, repetition_penalty=1.6, ignore_eos=True),
        SamplingParams(max_tokens=12, presence_penalty=1.5, frequency_penalty=1.0, ignore_eos=True),
        SamplingParams(max_tokens=12, logit_bias={plain[0]: -100.0, plain[3]: 3.0}, ignore_eos=True),
        SamplingParams(max_tokens=12, min_tokens=6, stop_token_ids=[plain[1], plain[2]]),
        SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.2,
                       seed=11, n=2, ignore_eos=True),
    ]
    engine = LLMEngine(loaded)
    seqs = [engine.add_request(DecodeRequest(prompt), p) for p in cases]
    while engine.has_work():
        engine.step()
    for seq, p in zip(seqs, cases):
        for s in [seq] + seq.siblings:
            seed = None if p.seed is None else p.seed + s.index
            want = _reference_generate(loaded.model, prompt, p, seed, eos)
            assert s.output_ids == want, (p, s.index)
            assert want != plain
    stopped = seqs[3].output_ids
    assert len(stopped) >= 6 and not set(stopped[:5]) & {plain[1], plain[2]}


def test_stop_strings_wait_for_min_tokens(tiny_pipeline):
    """As vLLM: a stop string is matched only once more than min_tokens tokens were generated."""
    from pipeline.engine.detokenizer import IncrementalDetokenizer

    tok = tiny_pipeline.loaded.processor.tokenizer
    ids = tok.encode(" red red red", add_special_tokens=False)  # the tiny tokenizer: " ", "re", "d", " ", ...
    texts = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    first = next(i for i, t in enumerate(texts) if "red" in t)
    eager = IncrementalDetokenizer(tok, ["red"])
    assert [eager.add(ids[: i + 1]) for i in range(first + 1)][-1] and eager.text == texts[first][:-3]
    late = IncrementalDetokenizer(tok, ["red"], min_tokens=first + 1)
    hits = [late.add(ids[: i + 1]) for i in range(len(ids))]
    assert not any(hits[: first + 1]) and any(hits), "matched, but only past min_tokens"
    assert late.text.count("red") == 1 and late.text.startswith(texts[first])

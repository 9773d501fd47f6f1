"""The prompt's log-probabilities (SamplingParams.prompt_logprobs) equal log_softmax of HF's forward on the same
prompt (the oracle, tests/helpers.meta_reference; trimmed: the masking reference) at every prompt position, within
1e-4 in fp32: text-only and image prompts, whole and chunked, batched with others, with n > 1 and max_tokens 0."""

import pytest
import torch

from pipeline.config import EngineConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.quality.reference import reference_logits
from pipeline.types import DecodeRequest
from tests.helpers import PROMPTS, meta_reference

WHOLE = 1 << 20
TOP = 3
SPECS = [  # (prompt, images, trimming): text-only short and long, an image untrimmed, trimmed, two images trimmed
    (PROMPTS[3], [], TrimConfig(policy="none")),
    (" ".join(PROMPTS * 3), [], TrimConfig(policy="none")),
    (PROMPTS[0], ["1tile"], TrimConfig(policy="none")),
    (PROMPTS[1], ["4tile"], TrimConfig(k_ratio=0.1)),
    (PROMPTS[2], ["1tile", "2tile"], TrimConfig(policy="mass", mass=0.4)),
]


@pytest.fixture(scope="module")
def cases(tiny_pipeline, imgs):
    """(decode request, the oracle's log_softmax (S, V) of every prompt row) per spec."""
    pipe, model = tiny_pipeline, tiny_pipeline.loaded.model
    out = []
    for prompt, names, cfg in SPECS:
        prepared = pipe.prepare(prompt, [imgs[n] for n in names])
        request = pipe.trim(prepared, cfg) if names else DecodeRequest(prepared.input_ids.tolist())
        with torch.no_grad(), meta_reference(model):
            logp = torch.log_softmax(reference_logits(model, prepared, cfg), dim=-1)
        out.append((request, logp))
    assert any(r.image is not None and r.image.num_kept < sum(r.image.visual_tokens) for r, _ in out)
    return out


def assert_matches(entries, request: DecodeRequest, logp: torch.Tensor, k: int = TOP):
    """Entry i scores prompt token i + 1 under row i of the oracle: its logprob, rank and top k."""
    ids, vocab = request.prompt_token_ids, logp.shape[1]
    assert len(entries) == len(ids) - 1
    assert [e is None for e in entries] == [t >= vocab for t in ids[1:]]  # the image token: no logprob
    scored = [i for i, e in enumerate(entries) if e is not None]
    ours = torch.tensor([entries[i].logprob for i in scored])
    torch.testing.assert_close(ours, logp[scored, [ids[i + 1] for i in scored]], atol=1e-4, rtol=0)
    for i in scored:
        e, row = entries[i], logp[i]
        assert e.token_id == ids[i + 1]
        target = row[ids[i + 1]]
        assert int((row > target + 1e-4).sum()) + 1 <= e.rank <= int((row >= target - 1e-4).sum())  # near-ties
        assert len(e.top) == k
        top_ids, top_v = [t for t, _ in e.top], torch.tensor([v for _, v in e.top])
        torch.testing.assert_close(top_v, row.topk(k).values, atol=1e-4, rtol=0)
        torch.testing.assert_close(row[top_ids], top_v, atol=1e-4, rtol=0)  # ties may swap ids, never values


@pytest.mark.parametrize("budget", [WHOLE, 5, 16])
def test_prompt_logprobs_equal_hf_forward(tiny_pipeline, cases, budget):
    """Every prompt in one engine (batched prefill; chunks of `budget` rows sharing steps), scored only
    (max_tokens 0): each completion ends at once with no token, completion 0 carrying the whole prompt's scores."""
    engine = LLMEngine(tiny_pipeline.loaded, EngineConfig(step_token_budget=budget))
    params = SamplingParams(max_tokens=0, prompt_logprobs=TOP, n=2)
    for i, (request, _) in enumerate(cases):
        engine.add_request(request, params, f"r{i}")
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert engine.stats().kv_used_bytes == 0 and engine.num_requests == 0
    assert len(outs) == 2 * len(cases)
    assert all(o.finished and o.finish_reason == "length" and not o.new_token_ids and not o.new_text for o in outs)
    assert all(o.prompt_logprobs is None for o in outs if o.index == 1)
    for i, (request, logp) in enumerate(cases):
        (out,) = [o for o in outs if o.request_id == f"r{i}" and o.index == 0]
        assert_matches(out.prompt_logprobs, request, logp)


def test_prompt_logprobs_with_generation_and_preemption(tiny_pipeline, cases):
    """Generating after the prompt is scored: the scores come with completion 0's first token and the tokens are
    those of a request without prompt_logprobs, while a stream growing into a small pool preempts the prompts
    mid-prefill (as tests/unit/test_prefill.py's)."""
    loaded = tiny_pipeline.loaded
    (short, _), (text, text_logp), (image, image_logp) = cases[0], cases[1], cases[3]
    greedy, growing = SamplingParams(max_tokens=6, ignore_eos=True), SamplingParams(max_tokens=40, ignore_eos=True)
    expected = [s.output_ids for s in LLMEngine(loaded).generate([short, text, image], [growing, greedy, greedy])]
    probe = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**22, block_size=4))
    one = SamplingParams(max_tokens=1)
    need = sum(probe.kv_bytes_for(r, one) for r in (short, text, image)) + 4 * probe.kv.blocks.page_bytes
    engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=need, block_size=4, kv_watermark=0.0,
                                            step_token_budget=4))
    stream = engine.add_request(short, growing, "stream")
    engine.step()
    asked = greedy.model_copy(update={"prompt_logprobs": 0})
    scored = [engine.add_request(r, asked, f"s{i}") for i, r in enumerate((text, image))]
    firsts = {}
    while engine.has_work():
        for o in engine.step():
            firsts.setdefault(o.request_id, o)
    assert engine.stats().preemptions > 0 and engine.stats().kv_used_bytes == 0
    assert [s.output_ids for s in [stream, *scored]] == expected
    assert firsts["stream"].prompt_logprobs is None
    for i, (request, logp) in enumerate(((text, text_logp), (image, image_logp))):
        out = firsts[f"s{i}"]
        assert out.new_token_ids and out.index == 0
        assert_matches(out.prompt_logprobs, request, logp, k=0)


def test_not_asked_not_computed(tiny_pipeline, cases, monkeypatch):
    """Without prompt_logprobs the lm_head runs over no prompt row but the last."""
    engine = LLMEngine(tiny_pipeline.loaded, EngineConfig(step_token_budget=7))
    calls = []
    real = engine.runner.prefiller._head
    monkeypatch.setattr(engine.runner.prefiller, "_head", lambda h: calls.append(h.shape[0]) or real(h))
    (seq,) = engine.generate([cases[1][0]], SamplingParams(max_tokens=2))
    assert seq.prompt_logprobs is None and sum(calls) == 1  # chunks before the last: 0 rows

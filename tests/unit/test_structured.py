"""Structured output in the engine (xgrammar): every constrained completion matches its grammar, grammars are
compiled once and cached, a bad spec is refused, and rows without a grammar sample as if alone."""

import json
import re

import jsonschema
import pytest
import torch

from pipeline.config import TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.engine.structured import GrammarCache, StructuredOutput
from pipeline.engine.token_mask import allocate_bitmask, apply_token_bitmask, unpack_bitmask
from pipeline.errors import InvalidRequest
from tests.helpers import PROMPTS

# Bounded: every string and number has a length limit, so a random-weight model's completion must end.
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "label": {"type": "string", "maxLength": 6},
        "seen": {"type": "boolean"},
    },
    "required": ["colour", "count", "label", "seen"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def image_sources(tiny_pipeline, imgs):
    pipe = tiny_pipeline
    specs = [(PROMPTS[0], ["1tile"]), (PROMPTS[1], ["4tile"]), (PROMPTS[2], ["2tile"]), (PROMPTS[3], ["1tile", "4tile"])]
    return [pipe.trim(pipe.prepare(p, [imgs[n] for n in names]), TrimConfig(k_ratio=0.3)) for p, names in specs]


@pytest.fixture(scope="module")
def engine(tiny_pipeline):
    return LLMEngine(tiny_pipeline.loaded)


def _run(engine, sources, params):
    seqs = [engine.add_request(s, p) for s, p in zip(sources, params)]
    while engine.has_work():
        engine.step()
    return seqs


def test_fifty_seeded_image_requests_at_temperature_one_all_validate(engine, image_sources):
    schema = StructuredOutput.json_schema(SCHEMA)
    sources = [image_sources[i % len(image_sources)] for i in range(50)]
    params = [SamplingParams(max_tokens=64, temperature=1.0, seed=i, structured=schema) for i in range(50)]
    seqs = _run(engine, sources, params)
    texts = [s.text for s in seqs]
    for s in seqs:
        assert s.finish_reason == "stop", (s.finish_reason, s.text)
        jsonschema.validate(json.loads(s.text), SCHEMA)
    assert len(set(texts)) > 10, "seeded sampling at temperature 1 should vary between seeds"
    special = set(engine.tokenizer.all_special_ids) - engine.eos
    assert not any(t in special for s in seqs for t in s.output_ids), "no special token inside the grammar"


def test_regex_and_choice(engine, image_sources):
    regex = StructuredOutput(kind="regex", spec=r"(cat|dog)-[0-9]{2}")
    choice = StructuredOutput.choice(["left side", "right side", "centre"])
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=i, structured=spec)
              for i in range(6) for spec in (regex, choice)]
    seqs = _run(engine, [image_sources[i % 4] for i in range(len(params))], params)
    for s in seqs:
        if s.params.structured == regex:
            assert re.fullmatch(r"(cat|dog)-[0-9]{2}", s.text), s.text
        else:
            assert s.text in ("left side", "right side", "centre"), s.text


def test_unconstrained_rows_sample_as_without_the_constrained_ones(tiny_pipeline, image_sources):
    free = [SamplingParams(max_tokens=12, temperature=1.0, seed=100 + i, ignore_eos=True) for i in range(4)]
    alone = [s.output_ids for s in _run(LLMEngine(tiny_pipeline.loaded), image_sources, free)]
    engine = LLMEngine(tiny_pipeline.loaded)
    schema = StructuredOutput.json_schema(SCHEMA)
    constrained = [SamplingParams(max_tokens=64, temperature=1.0, seed=i, structured=schema) for i in range(4)]
    mixed = _run(engine, image_sources + image_sources, free + constrained)
    assert engine.stats().decode_rows > engine.stats().decode_steps, "rows must share decode steps"
    assert [s.output_ids for s in mixed[:4]] == alone
    for s in mixed[4:]:
        jsonschema.validate(json.loads(s.text), SCHEMA)


def test_max_tokens_cuts_the_json_with_finish_reason_length(engine, image_sources):
    """As OpenAI: the grammar cannot finish in max_tokens, so the text is a prefix of valid JSON, not JSON."""
    spec = StructuredOutput.json_schema({"type": "object", "properties": {"note": {"type": "string"}},
                                         "required": ["note"]})
    (seq,) = _run(engine, image_sources[:1], [SamplingParams(max_tokens=12, temperature=1.0, seed=3, structured=spec)])
    assert seq.finish_reason == "length" and len(seq.output_ids) == 12
    assert seq.text.startswith('{"note"')
    with pytest.raises(ValueError):
        json.loads(seq.text)


def test_a_grammar_that_can_only_end_meets_min_tokens_and_ignore_eos(engine, image_sources):
    """A constraint complete after a few tokens (a JSON boolean, a choice) allows only EOS, which min_tokens and
    ignore_eos ban: nothing can be sampled. The completion ends there with finish_reason "stop" and the grammar's
    whole output (it used to fail in the engine: "error", an HTTP 500); a token the grammar requires that is one of
    stop_token_ids, banned by min_tokens, ends it the same way; a request beside them is not touched."""
    boolean = StructuredOutput.json_schema({"type": "boolean"})
    yes_no = StructuredOutput.choice(["yes", "no"])
    yes_id = engine.tokenizer.encode("yes", add_special_tokens=False)
    params = [SamplingParams(max_tokens=30, min_tokens=20, structured=boolean),
              SamplingParams(max_tokens=30, ignore_eos=True, structured=boolean, n=2, temperature=1.0, seed=1),
              SamplingParams(max_tokens=30, min_tokens=5, ignore_eos=True, structured=yes_no),
              SamplingParams(max_tokens=30, min_tokens=5, stop_token_ids=yes_id[:1],
                             structured=StructuredOutput.choice(["yes"])),
              SamplingParams(max_tokens=9, ignore_eos=True)]
    seqs = _run(engine, [image_sources[i % 4] for i in range(len(params))], params)
    for seq in seqs[:4]:
        for s in [seq] + seq.siblings:
            assert s.finish_reason == "stop", (s.finish_reason, s.text)
    assert [s.text for s in seqs[:2]] in (["true", "true"], ["false", "true"], ["true", "false"], ["false", "false"])
    assert all(s.text in ("true", "false") for s in seqs[1].siblings)
    assert seqs[2].text in ("yes", "no") and seqs[3].text == ""
    assert seqs[4].finish_reason == "length" and len(seqs[4].output_ids) == 9
    assert not engine.has_work() and engine.kv.used_bytes == 0


def test_bad_specs_are_invalid_requests_naming_the_problem(engine, image_sources):
    with pytest.raises(InvalidRequest, match="json schema"):
        engine.make_sequence(image_sources[0], SamplingParams(structured=StructuredOutput.json_schema(
            {"type": "object", "properties": {"a": {"type": "nonsense"}}})))
    with pytest.raises(InvalidRequest, match="regex"):
        engine.make_sequence(image_sources[0], SamplingParams(structured=StructuredOutput(kind="regex", spec="a(")))
    with pytest.raises(InvalidRequest, match="not JSON"):
        StructuredOutput.json_schema("{nope")
    with pytest.raises(InvalidRequest, match="choice"):
        StructuredOutput.choice([])


def test_grammars_compile_once_per_schema_and_the_cache_is_bounded(tiny_pipeline):
    tok = tiny_pipeline.loaded.processor.tokenizer
    cache = GrammarCache(tok, 384, [382], max_entries=2)
    a = StructuredOutput.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}})
    same = StructuredOutput.json_schema('{"properties": {"x": {"type": "integer"}}, "type": "object"}')
    assert a == same  # canonical JSON: one key whatever the key order or spacing
    first = cache.compiled(a)
    assert cache.compiled(same) is first and (cache.hits, cache.misses) == (1, 1)
    cache.compiled(StructuredOutput(kind="regex", spec="[a-z]+"))
    cache.compiled(StructuredOutput(kind="regex", spec="[0-9]+"))  # evicts `a`, the least recently used
    assert len(cache) == 2
    assert cache.compiled(a) is not first and cache.misses == 4


def test_bitmask_matches_a_reference_mask_on_the_logits(tiny_pipeline):
    """The row a matcher fills allows exactly the tokens whose text can start one of the choices; the sampler's
    torch hook and xgrammar's kernel mask the logits alike; a row without a grammar is untouched."""
    import xgrammar as xgr

    tok = tiny_pipeline.loaded.processor.tokenizer
    matcher = GrammarCache(tok, 384, [382]).matcher(StructuredOutput.choice(["yes", "no"]))
    bitmask = allocate_bitmask(2, 384)
    matcher.fill_bitmask(bitmask, 0)
    assert bitmask.shape == (2, 12) and bitmask.dtype == torch.int32
    logits, theirs = torch.zeros(2, 384), torch.zeros(2, 384)
    apply_token_bitmask(logits, bitmask)
    xgr.apply_token_bitmask_inplace(theirs, bitmask)
    assert torch.equal(logits, theirs)
    allowed = {i for i in range(384) if logits[0, i] == 0}
    vocab = {i: tok.decode([i]) for i in range(384) if i not in tok.all_special_ids and i < 376}
    reference = {i for i, text in vocab.items() if text and ("yes".startswith(text) or "no".startswith(text))}
    assert allowed == reference
    assert bool((logits[1] == 0).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (scripts/gpu_check.sh runs this on one)")
def test_structured_output_on_cuda(image_sources):
    """The engine on CUDA: the bitmask goes to the logits' device, xgrammar's CUDA kernel and the sampler's torch
    hook mask alike, and constrained completions validate."""
    import xgrammar as xgr

    from pipeline.config import ModelConfig
    from pipeline.model.loader import load_model
    from pipeline.types import map_tensors

    loaded = load_model(ModelConfig(device="cuda"), parts=("text",))
    engine = LLMEngine(loaded)
    schema = StructuredOutput.json_schema(SCHEMA)
    params = [SamplingParams(max_tokens=64, temperature=1.0, seed=i, structured=schema) for i in range(8)]
    on_cuda = [map_tensors(image_sources[i % 4], lambda t: t.cuda()) for i in range(8)]
    for s in _run(engine, on_cuda, params):
        jsonschema.validate(json.loads(s.text), SCHEMA)
    matcher = engine.grammars.matcher(schema)
    bitmask = allocate_bitmask(2, 384)
    matcher.fill_bitmask(bitmask, 1)
    ours, theirs = torch.randn(2, 384, device="cuda"), None
    theirs = ours.clone()
    apply_token_bitmask(ours, bitmask)
    xgr.apply_token_bitmask_inplace(theirs, bitmask.cuda())
    assert torch.equal(ours, theirs)


def test_json_strings_hold_no_surrogate_code_points(engine):
    """xgrammar admits U+D800-DFFF in JSON strings as ED A0-BF xx (invalid UTF-8: three U+FFFD on the wire, so
    maxLength broke at temperature 1); our grammars narrow its string classes. If xgrammar prints its classes
    differently one day, the first assert says the narrowing no longer applies."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bounded = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}, "required": ["a"]}
    for schema in (bounded, {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}):
        spec = StructuredOutput.json_schema(schema)
        assert r"\ud800-\udfff]" in str(spec.grammar())
        byte_token = {b: engine.tokenizer.convert_tokens_to_ids(c) for b, c in bytes_to_unicode().items()}
        matcher = engine.grammars.matcher(spec)
        for b in b'{"a": "' + b"\xed":
            matcher.accept(byte_token[b])
        bitmask = allocate_bitmask(1, engine.sampler.vocab_size)
        matcher.fill_bitmask(bitmask, 0)
        allowed = unpack_bitmask(bitmask, engine.sampler.vocab_size)[0]
        assert not any(allowed[byte_token[b]] for b in range(0xA0, 0xC0)), "a surrogate's second byte is allowed"
        assert all(allowed[byte_token[b]] for b in range(0x80, 0xA0)), "U+D000-D7FF must stay allowed"

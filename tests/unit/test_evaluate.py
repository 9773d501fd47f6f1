"""crosstrim eval: its numbers equal a direct computation through the same stages."""

import statistics

from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.sampling import SamplingParams
from pipeline.inprocess import Pipeline
from pipeline.quality.evaluate import Row, diagnostics, evaluate, later_blinded_texts
from pipeline.quality.synthetic import generate_samples

MAX_NEW = 6


def test_eval_numbers_match_a_direct_computation(tiny_pipeline):
    pipe = tiny_pipeline
    samples = generate_samples(6, seed=4242)
    k = 0.3
    direct = [pipe.generate(s.prompt, [s.image], SamplingParams(max_tokens=MAX_NEW), TrimConfig(k_ratio=k)) for s in samples]
    # Labels the eval can only score right by reproducing the pipeline's outputs: odd rows can never match.
    rows = [Row(s.id, s.image, s.prompt, d.text.strip() if i % 2 == 0 else "\x00never", s.kind)
            for i, (s, d) in enumerate(zip(samples, direct))]
    result = evaluate(pipe, rows, [k], ["later"], MAX_NEW)
    (point,) = result["protocols"]["later"]
    assert point["accuracy"] == 3 / 6
    assert point["kept_fraction"] == statistics.mean(d.kept_tokens / d.visual_tokens for d in direct)
    random_direct = []
    for i, (s, d) in enumerate(zip(samples, direct)):
        cfg = TrimConfig(policy="random", budget_tokens=d.kept_tokens, seed=i)
        random_direct.append(pipe.generate(s.prompt, [s.image], SamplingParams(max_tokens=MAX_NEW), cfg).text.strip())
    assert point["random_accuracy"] == sum(t == r.answer for t, r in zip(random_direct, rows)) / 6


def test_random_control_keeps_the_same_count_and_differs(tiny_pipeline, imgs):
    pipe = tiny_pipeline
    prepared = pipe.prepare("where is the red one", [imgs["4tile"]])
    trimmed = pipe.trim(prepared, TrimConfig(k_ratio=0.1))
    control = pipe.trim(prepared, TrimConfig(policy="random", budget_tokens=trimmed.image.kept_tokens[0], seed=0))
    assert control.image.kept_tokens == trimmed.image.kept_tokens
    assert set(control.image.kept_index.tolist()) != set(trimmed.image.kept_index.tolist())


def test_diagnostics_are_fractions(tiny_pipeline):
    rows = [Row(s.id, s.image, s.prompt, s.answer) for s in generate_samples(2, seed=5)]
    d = diagnostics(tiny_pipeline, rows, k_ratio=0.15)
    assert all(0 < x <= 1 for x in d["first_layer_share_for_mass_per_head"])
    assert set(d["later_layer_coverage_by_kept"]) == {"5", "7"}
    assert all(0 <= x <= 1 for x in d["later_layer_coverage_by_kept"].values())


def test_later_layers_matter_for_the_demo_model():
    """Blinding the later cross-attention layers costs the trained model most of its accuracy (else any selection
    there would look perfect). The blinded path, without its hooks, reproduces the pipeline's untrimmed answers, so a
    low blinded score cannot come from decoding text differently."""
    pipe = Pipeline(ModelConfig(source="bundled:tiny-mllama-vqa"), engine=EngineConfig(max_running=32))
    samples = generate_samples(24, seed=31337)
    rows = [Row(s.id, s.image, s.prompt, s.answer, s.kind) for s in samples]
    result = evaluate(pipe, rows, [0.15], ["later"], 8)
    assert result["untrimmed_accuracy"] >= 0.8
    assert result["later_layers_blinded_accuracy"] <= 0.4
    prepared = [pipe.prepare(s.prompt, [s.image]) for s in samples[:6]]
    unblinded = later_blinded_texts(pipe, prepared, 8, blinded=False)
    direct = [pipe.generate(s.prompt, [s.image], SamplingParams(max_tokens=8), TrimConfig(policy="none")).text.strip()
              for s in samples[:6]]
    assert unblinded == direct


def test_eval_reports_the_target_policy_at_its_fraction(tiny_pipeline):
    rows = [Row(s.id, s.image, s.prompt, s.answer, s.kind) for s in generate_samples(4, seed=99)]
    result = evaluate(tiny_pipeline, rows, [0.3], ["later"], MAX_NEW, target_fractions=[0.25])
    topk, target = result["protocols"]["later"]
    assert (topk["policy"], target["policy"]) == ("topk_union", "target")
    prepared = [tiny_pipeline.prepare(r.prompt, [r.image]) for r in rows]
    expected = statistics.mean(tiny_pipeline.trim(p, TrimConfig(policy="target", target_fraction=0.25)).image.kept_fraction
                               for p in prepared)
    assert target["kept_fraction"] == expected
    assert 0.25 <= target["kept_fraction"] < 0.26  # ceil(0.25 * tokens) of each image's tokens


def test_target_at_topk_keeps_what_topk_kept_and_random_matches_each(tiny_pipeline):
    """target_at_topk lines target up with topk_union's mean kept fraction; every random control keeps, per image,
    as many tokens as the policy it controls; target's per-image fraction is its target (up to one token)."""
    rows = [Row(s.id, s.image, s.prompt, s.answer, s.kind) for s in generate_samples(4, seed=7)]
    result = evaluate(tiny_pipeline, rows, [1.0, 0.3], ["later"], 2, target_fractions=[0.2], target_at_topk=True)
    keep_all, topk, fixed, matched = result["protocols"]["later"]
    assert [p["policy"] for p in (keep_all, topk, fixed, matched)] == ["topk_union", "topk_union", "target", "target"]
    assert matched["target_fraction"] == topk["kept_fraction"] < 1  # keep-all (1.0) gets no target twin
    assert abs(matched["kept_fraction"] - topk["kept_fraction"]) < 0.02
    for p in result["protocols"]["later"]:
        assert p["random_kept_fraction"] == p["kept_fraction"]
        assert p["kept_fraction_min"] <= p["kept_fraction"] <= p["kept_fraction_max"]
    for p in (fixed, matched):
        assert p["target_fraction"] <= p["kept_fraction_min"] and p["kept_fraction_max"] < p["target_fraction"] + 0.02
        assert p["kept_fraction_stdev"] < 0.01

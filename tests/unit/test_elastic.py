"""Elastic trimming (docs/elastic.md): kept tokens stored best first change no number; the kept fraction follows the
pool's pressure; a shed sequence equals the masking reference from the shed step on."""

import dataclasses
import math

import pytest
import torch

from pipeline.config import EngineConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.model.selection import select_target
from pipeline.quality.reference import reference_generate
from pipeline.types import CrossKV, DecodeRequest
from tests.helpers import PROMPTS, meta_reference

MAX_NEW = 10


def reordered(request: DecodeRequest, order: torch.Tensor) -> DecodeRequest:
    """The same request with its kept tokens (image state and cross K/V) in another order."""
    image = dataclasses.replace(request.image, kept_image=request.image.kept_image[order],
                                kept_index=request.image.kept_index[order])
    resume = dataclasses.replace(request.resume, cross=CrossKV(request.resume.cross.kv[:, :, :, order]))
    return DecodeRequest(request.prompt_token_ids, image, resume)


@pytest.mark.parametrize("image_names", [["4tile"], ["1tile", "4tile"]], ids=["one", "two"])
@pytest.mark.parametrize("cfg", [TrimConfig(k_ratio=0.15), TrimConfig(policy="none")], ids=["k0.15", "none"])
def test_order_in_pages_changes_nothing(tiny_pipeline, imgs, image_names, cfg):
    """Kept tokens are stored best first; in position order (the old layout) the tokens are the same and the first
    logits equal within float-summation tolerance. Two images: rows between the image tokens see only the first,
    so the visibility masks must follow the order."""
    pipe = tiny_pipeline
    images = [imgs[n] for n in image_names]
    request = pipe.trim(pipe.prepare(PROMPTS[1], images), cfg)
    positions = request.image.kept_positions
    by_position = reordered(request, torch.argsort(positions))
    assert not torch.equal(positions, by_position.image.kept_positions), "the stored order is not position order"
    assert torch.equal(torch.sort(positions).values, by_position.image.kept_positions)
    a, b = pipe.engine.generate([request, by_position], SamplingParams(max_tokens=MAX_NEW))
    assert a.output_ids == b.output_ids
    la, lb = pipe.engine.prefill_logits(request), pipe.engine.prefill_logits(by_position)
    assert torch.allclose(la, lb, atol=1e-5, rtol=0)


def test_stored_order_is_importance_order(tiny_pipeline, imgs):
    """The first m stored tokens of one image are exactly what `target` keeps at m tokens: the tail is the least
    important, so shedding it leaves a harder trim's selection."""
    pipe = tiny_pipeline
    prepared = pipe.prepare(PROMPTS[0], [imgs["4tile"]])
    full = pipe.trim(prepared, TrimConfig(policy="none")).image
    n = full.num_kept
    for m in (1, 17, n // 3, n // 2):
        target = pipe.trim(prepared, TrimConfig(policy="target", target_fraction=m / n)).image
        assert target.num_kept == m
        assert set(full.kept_index[:m].tolist()) == set(target.kept_index.tolist())
        assert torch.equal(target.kept_index, full.kept_index[:m])  # and in the same order


def test_importance_order_prefixes_are_targets():
    torch.manual_seed(0)
    from pipeline.model.selection import importance_order
    scores = torch.rand(4, 60)
    order = importance_order(scores, torch.arange(60))
    for m in (1, 7, 30, 60):
        assert torch.sort(order[:m]).values.tolist() == select_target(scores, m / 60).tolist()


ELASTIC = TrimConfig(policy="elastic", floor_fraction=0.2, ceiling_fraction=0.6)


def test_elastic_fraction_rule():
    cfg = ELASTIC.model_copy(update={"pressure_low": 0.5, "pressure_high": 0.9})
    at = lambda p: cfg.model_copy(update={"pressure": p}).elastic_fraction()  # noqa: E731
    assert at(None) == at(0.0) == at(0.5) == 0.6
    assert at(0.9) == at(3.0) == 0.2
    assert at(0.7) == pytest.approx(0.4)
    assert cfg.model_copy(update={"pressure": 1.0, "elastic": False}).elastic_fraction() == 0.6
    with pytest.raises(ValueError, match="floor_fraction"):
        TrimConfig(policy="elastic", floor_fraction=0.7, ceiling_fraction=0.6)


@pytest.mark.parametrize("image_names", [["4tile"], ["2tile", "4tile"]], ids=["one", "two"])
def test_elastic_at_zero_and_full_pressure(tiny_pipeline, imgs, image_names):
    """No pressure: the ceiling's tokens (target at the ceiling fraction; untrimmed at a ceiling of 1); full
    pressure: the floor's; opted out: the ceiling's at any pressure. The choice is reported with the request."""
    pipe = tiny_pipeline
    images = [imgs[n] for n in image_names]
    params = SamplingParams(max_tokens=MAX_NEW)

    def run(cfg):
        gen = pipe.generate(PROMPTS[1], images, params, cfg)
        return gen.token_ids, gen.kept_tokens

    ceiling = run(TrimConfig(policy="target", target_fraction=0.6))
    floor = run(TrimConfig(policy="target", target_fraction=0.2))
    assert ceiling != floor
    assert run(ELASTIC.model_copy(update={"pressure": 0.0})) == ceiling
    assert run(ELASTIC.model_copy(update={"pressure": 1.0})) == floor
    assert run(ELASTIC.model_copy(update={"pressure": 1.0, "elastic": False})) == ceiling
    untrimmed = run(TrimConfig(policy="none"))
    assert run(TrimConfig(policy="elastic", pressure=0.0)) == untrimmed  # the default ceiling: every token
    image = pipe.trim(pipe.prepare(PROMPTS[1], images), ELASTIC.model_copy(update={"pressure": 0.7})).image
    assert image.chosen_fraction == pytest.approx(0.4) and image.pressure == 0.7
    assert image.floor_tokens == sum(math.ceil(0.2 * n - 1e-9) for n in image.visual_tokens)


def test_pipeline_reads_its_engines_pressure(tiny_pipeline, imgs):
    """Unset, the pressure is the engine's now (an idle engine: 0, the ceiling)."""
    pipe = tiny_pipeline
    assert pipe.engine.pressure() == 0
    image = pipe.trim(pipe.prepare(PROMPTS[0], [imgs["1tile"]]), ELASTIC).image
    assert image.pressure == 0 and image.chosen_fraction == 0.6


def _overcommitted(loaded, sources, max_tokens, tight: str = "growth", block_size=4):
    """tight "growth": a pool that admits every prompt at once but holds only a quarter of their growth; "admission":
    one that holds the first two prompts and everybody's growth, so the others are admitted only if pages are shed."""
    probe = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**20, block_size=block_size)).kv
    prompts = [probe.pages_needed(s.prompt_len, s.num_kept) for s in sources]
    growth = sum(probe.pages_needed(s.prompt_len + max_tokens, s.num_kept) for s in sources) - sum(prompts)
    pages = sum(prompts) + growth // 4 if tight == "growth" else sum(prompts[:2]) + growth
    return LLMEngine(loaded, EngineConfig(kv_budget_bytes=pages * probe.blocks.page_bytes,
                                          block_size=block_size, kv_watermark=0.0, swap_budget_bytes=2**30))


@pytest.mark.parametrize("tight,image_names", [("growth", ["4tile"]), ("growth", ["1tile", "4tile"]),
                                               ("admission", ["4tile"])], ids=["growth-one", "growth-two", "admission"])
def test_shed_sequence_equals_masking_reference(tiny_pipeline, imgs, tight, image_names):
    """Elastic requests admitted at the ceiling into a pool too small for their growth (or for all of them at once):
    the engine sheds (instead of preempting, or holding admission), and every sequence's tokens equal the masking
    reference with its shed tokens masked from the step it was shed on; a non-elastic request is never shed."""
    pipe, model = tiny_pipeline, tiny_pipeline.loaded.model
    images = [imgs[n] for n in image_names]
    max_new = 24
    cfgs = [ELASTIC.model_copy(update={"pressure": 0.0})] * 3 + [TrimConfig(policy="target", target_fraction=0.6)]
    prepared = [pipe.prepare(p, images) for p in PROMPTS[:3]] + [pipe.prepare(PROMPTS[3], images)]
    requests = [pipe.trim(p, c) for p, c in zip(prepared, cfgs)]
    engine = _overcommitted(pipe.loaded, requests, max_new, tight)
    params = SamplingParams(max_tokens=max_new)
    seqs = [engine.add_request(r, params) for r in requests]
    while engine.has_work():
        engine.step()
    stats = engine.stats()
    assert stats.sheds > 0 and stats.kv_used_bytes == 0
    assert seqs[3].shed_at is None
    shed = [s for s in seqs if s.shed_at is not None]
    assert shed and stats.sheds == len(shed)
    assert stats.shed_tokens == sum(s.kept_at_admission - s.image.num_kept for s in shed)
    for seq, prep, cfg in zip(seqs, prepared, cfgs):
        if seq.shed_at is not None:
            assert seq.image.num_kept == seq.image.floor_tokens < seq.kept_at_admission
            assert 0 < seq.shed_at < max_new
        with meta_reference(model):
            expected = reference_generate(model, prep, cfg, max_new, None if seq.shed_at is None
                                          else (seq.shed_at, seq.image.kept_positions))
        assert seq.output_ids == expected


@pytest.mark.parametrize("layout", ["run", "page"])
def test_shed_cross_keeps_the_first_tokens_and_frees_the_tail(layout):
    """KVCache.shed_cross: what is read after equals the first tokens written; the pages past them are free."""
    from pipeline.engine.kv_cache import KVCache
    kv = KVCache(2**16, 4, [1, 3], 2, 8, torch.float32, "cpu", block_size=4, cross_layout=layout)
    other = kv.allocate(3, 5)  # a neighbour whose K/V must not change
    table = kv.allocate(6, 23)
    cross, neighbour = torch.randn(2, 2, 2, 23, 8), torch.randn(2, 2, 2, 5, 8)
    kv.write_cross(table, cross)
    kv.write_cross(other, neighbour)
    used, serial = kv.blocks.used, table.allocation
    freed = kv.shed_cross(table, 9)
    assert freed == len(range(-(-9 // kv.cross_block_size), -(-23 // kv.cross_block_size))) > 0
    assert kv.blocks.used == used - freed and table.allocation != serial and table.cross_tokens == 9
    assert torch.equal(kv.read_cross(table), cross[..., :9, :])
    assert torch.equal(kv.read_cross(other), neighbour)
    a, row = kv.layout.where[True, 1]
    rows = table.cross_rows[a]
    assert rows.shape[0] == 9
    kv.release(table)
    kv.release(other)
    assert kv.blocks.used == 0


def test_request_trim_fields_and_opt_out():
    """The request's `trim` merges over the deployment default: opt in by name, set bounds, opt out."""
    from deployments import api
    from pipeline.errors import InvalidRequest

    default = TrimConfig(floor_fraction=0.3)
    assert api.to_trim_config("elastic", default).policy == "elastic"
    assert api.to_trim_config("elastic", default).floor_fraction == 0.3
    cfg = api.to_trim_config(api.TrimOverride(policy="elastic", ceiling_fraction=0.8, elastic=False), default)
    assert cfg.sheddable is False and cfg.model_copy(update={"pressure": 1.0}).elastic_fraction() == 0.8
    with pytest.raises(InvalidRequest, match="floor_fraction"):
        api.to_trim_config(api.TrimOverride(policy="elastic", floor_fraction=0.9, ceiling_fraction=0.5), default)


def test_pool_pressure_is_cached_and_a_silent_pool_reads_full():
    import asyncio

    from deployments.pressure import PoolPressure

    class Call:
        def __init__(self, fail=False):
            self.calls, self.fail = 0, fail

        async def remote(self):
            self.calls += 1
            if self.fail:
                raise RuntimeError("no replica")
            return 0.42

    class Pool:
        def __init__(self, fail=False):
            self.pressure = Call(fail)

    async def main():
        pool, broken = Pool(), Pool(fail=True)
        reader = PoolPressure(pool, period_s=60)
        got = await asyncio.gather(*(reader.read() for _ in range(5)))
        assert got == [0.42] * 5 and pool.pressure.calls == 1  # one call shared, then cached
        assert await PoolPressure(broken).read() == 1.0

    asyncio.run(main())


def test_response_trim_reports_the_shed():
    from deployments.chat import ChatRenderer
    from deployments.responses import Completion
    from deployments.stream import TrimSummary

    summary = TrimSummary(130, 130, 1.0, 10, 10, "kv", 1, 1, 0.1, chosen_fraction=1.0, pressure=0.2, floor_tokens=28)
    render = ChatRenderer.__new__(ChatRenderer)
    render.trim, render.req = summary.as_dict(), type("R", (), {"return_token_ids": False})()
    done = Completion(0, kept_tokens_end=28, shed_at=3)
    trim = render.extra([], done)["trim"]
    assert trim["kept_tokens"] == 130 and trim["kept_tokens_end"] == 28 and trim["shed_at"] == 3
    assert trim["chosen_fraction"] == 1.0 and trim["pressure"] == 0.2
    assert "kept_tokens_end" not in render.extra([], Completion(0))["trim"]


def test_bench_elastic_writes_its_results(tmp_path):
    """`crosstrim bench elastic` at a toy size: every setting at every load, the issue's keys, a figure."""
    import json

    from pipeline.cli import main

    out, fig = tmp_path / "elastic.json", tmp_path / "elastic.png"
    assert main(["bench", "elastic", "--requests", "6", "--loads", "1,4", "--json", str(out), "--figure", str(fig)]) == 0
    result = json.loads(out.read_text())
    rows = result["results"]
    assert {(r["setting"], r["load"]) for r in rows} == {(s, ld) for s in ("untrimmed", "fixed default", "fixed floor",
                                                                          "elastic") for ld in (1.0, 4.0)}
    for r in rows:
        assert {"setting", "load", "accuracy", "goodput", "ttft_p99_s", "refused", "preempted", "shed"} <= set(r)
    assert fig.stat().st_size > 0 and set(result["verdict"]) >= {"not_dominated_at_load", "elastic_minus_fixed",
                                                                   "coincides_with_at_load"}
    assert result["step_cost"]["base_ms"] > 0 and str(result["slo_ttft_s"]) in result["verdict_at_slo"]

"""The simulated clock of `crosstrim bench elastic`: a step's work as the engine records it (StepWork) and the
linear step-cost model fitted to timed steps (pipeline/bench/step_cost.py)."""

import pytest

from pipeline.bench.step_cost import CALIBRATED, StepCost, step_cost
from pipeline.config import EngineConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.engine.step_work import StepWork

TRUE = StepCost(base_ms=5.0, prefill_row_ms=0.05, decode_row_ms=0.2, prefill_cross_tile_row_ms=0.01,
                decode_cross_tile_ms=0.3)


def test_fit_recovers_the_coefficients_of_linear_steps():
    """Timed steps that are exactly linear in the work give back the model (R^2 1); a term the data make negative
    is dropped to 0, not fitted below it."""
    works = [StepWork(p, d, p * k, d * k) for p, d, k in
             [(27, 0, 65), (108, 0, 260), (0, 1, 65), (0, 4, 260), (0, 16, 130), (54, 8, 195), (0, 8, 65)]]
    rows = [{**w.__dict__, "ms": TRUE.seconds(w, 65) * 1e3} for w in works]
    fit, r2 = StepCost.fit(rows, tile_tokens=65)
    assert r2 == pytest.approx(1.0)
    for got, want in zip(fit.as_dict().values(), TRUE.as_dict().values()):
        assert got == pytest.approx(want, abs=1e-6)
    falling = [{**r, "ms": 10.0 - r["decode_rows"] * 0.1} for r in rows]  # more rows, faster: no such term
    assert StepCost.fit(falling, tile_tokens=65)[0].decode_row_ms == 0.0


def test_a_step_costs_more_with_more_work():
    idle = StepWork()
    small = StepWork(decode_rows=4, decode_cross=4 * 78)  # 4 sequences at 30% of 260 tokens
    full = StepWork(decode_rows=4, decode_cross=4 * 260)
    assert TRUE.seconds(idle, 65) == 0.0  # the engine did not run
    assert TRUE.seconds(small, 65) < TRUE.seconds(full, 65)
    assert TRUE.seconds(full, 65) == pytest.approx((5.0 + 4 * 0.2 + 16 * 0.3) / 1e3)
    assert step_cost("const:25")[0].seconds(full, 65) == step_cost("const:25")[0].seconds(small, 65) == 0.025
    for cost, _ in CALIBRATED.values():  # the shipped calibrations charge for kept tokens
        assert cost.base_ms > 0 and cost.seconds(small, 65) < cost.seconds(full, 65)


def test_engine_records_each_steps_work(tiny_pipeline, imgs):
    """The first step prefills the whole prompt, every row attending every kept token; each next decodes one row
    reading the kept tokens once."""
    pipe = tiny_pipeline
    request = pipe.trim(pipe.prepare("What is in the picture?", [imgs["2tile"]]),
                        TrimConfig(policy="target", target_fraction=0.5))
    engine = LLMEngine(pipe.loaded, EngineConfig(kv_budget_bytes=2**22))
    engine.add_request(request, SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    kept = request.image.num_kept
    assert engine.last_work == StepWork(prefill_rows=request.prompt_len, prefill_cross=request.prompt_len * kept)
    engine.step()
    assert engine.last_work == StepWork(decode_rows=1, decode_cross=kept)

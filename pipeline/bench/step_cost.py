"""StepCost: a simulated engine step's seconds from the work in it (StepWork), linear in prompt rows, decoded rows
and the kept visual tokens cross-attention reads, in tiles' worth so a model's fit applies to another's requests;
fitted to timed real steps (scripts/calibrate_step_cost.py). Deterministic: a bench's clock, not a measurement."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.engine.step_work import StepWork

TERMS = ("base_ms", "prefill_row_ms", "decode_row_ms", "prefill_cross_tile_row_ms", "decode_cross_tile_ms")


@dataclass(frozen=True)
class StepCost:
    base_ms: float  # any step: weights read once, the host's work
    prefill_row_ms: float  # a prompt row through the model
    decode_row_ms: float  # a decoded sequence's row
    prefill_cross_tile_row_ms: float  # a prompt row attending one tile's worth of kept visual tokens
    decode_cross_tile_ms: float  # a decoded sequence reading one tile's worth of kept visual tokens' K/V

    def features(self, work: StepWork, tile_tokens: int) -> list[float]:
        """The work as the model's terms (1 for the base); kept tokens in tiles of `tile_tokens`."""
        return [1.0, work.prefill_rows, work.decode_rows, work.prefill_cross / tile_tokens,
                work.decode_cross / tile_tokens]

    def seconds(self, work: StepWork, tile_tokens: int) -> float:
        """A step's simulated seconds; an empty step costs nothing (the engine did not run)."""
        if not (work.prefill_rows or work.decode_rows):
            return 0.0
        return sum(c * x for c, x in zip(asdict(self).values(), self.features(work, tile_tokens))) / 1e3

    def as_dict(self) -> dict:
        return {k: round(v, 5) for k, v in asdict(self).items()}

    @classmethod
    def fit(cls, rows: list[dict], tile_tokens: int) -> tuple["StepCost", float]:
        """Least squares of the relative error over timed steps (dicts with StepWork's fields and `ms`; relative, so
        the many cheap decode steps weigh as much as the few dear prefills), non-negative (a term whose coefficient
        comes out negative is dropped and the rest refitted); returns the model and its R^2."""
        zero = cls(*[0.0] * len(TERMS))
        x = torch.tensor([zero.features(StepWork(**{k: r[k] for k in StepWork.__dataclass_fields__}), tile_tokens)
                          for r in rows], dtype=torch.float64)
        y = torch.tensor([r["ms"] for r in rows], dtype=torch.float64)
        active = list(range(len(TERMS)))
        while True:
            coef = torch.linalg.lstsq(x[:, active] / y[:, None], torch.ones_like(y)[:, None]).solution[:, 0]
            if (coef >= 0).all() or len(active) == 1:
                break
            active.pop(int(coef.argmin()))
        full = torch.zeros(len(TERMS), dtype=torch.float64)
        full[active] = coef.clamp(min=0)
        residual = y - x @ full
        r2 = 1 - float(residual.pow(2).sum() / (y - y.mean()).pow(2).sum())
        return cls(*full.tolist()), r2


def tile_tokens(loaded) -> int:
    """Visual tokens of one tile of the model's vision tower (patches and the class token): the cost's unit."""
    vc = loaded.model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 + 1


# Fits of scripts/calibrate_step_cost.py on the development machine (1 thread, fp32); the command and its output
# are in BENCHMARKS.md "Elastic trimming". demo: the demo model's own steps (what `bench elastic` runs); bench:
# preset:bench's (142 M text parameters, 1,025-token tiles), a demo request's tiles standing for as many of its;
# the default of `bench elastic`, since the demo's step is host work that its kept tokens barely change.
CALIBRATED = {
    "demo": (StepCost(5.79564, 0.04341, 0.11075, 0.00317, 0.02578), "bundled:tiny-mllama-vqa, 2026-12-07"),
    "bench": (StepCost(60.98726, 3.31694, 10.99853, 0.54196, 4.46384), "preset:bench (2x2 tiles), 2026-12-07"),
}


def step_cost(spec: str) -> tuple[StepCost, str]:
    """A named calibration, a calibration JSON's fit, or const:MS; with a line saying which."""
    if spec.startswith("const:"):
        ms = float(spec.removeprefix("const:"))
        return StepCost(ms, 0.0, 0.0, 0.0, 0.0), f"constant {ms} ms a step"
    if spec in CALIBRATED:
        cost, source = CALIBRATED[spec]
        return cost, f"linear step cost fitted to timed real steps of {source} (scripts/calibrate_step_cost.py)"
    fit = json.loads(Path(spec).read_text())
    return StepCost(**fit["fit"]), f"linear step cost fitted to timed real steps of {fit['model']} ({spec})"

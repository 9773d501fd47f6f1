"""Where the first cross-attention layer looks: the share of its attention mass on the asked object's tokens,
against the share a uniform spread would give (Trimmed Llama's premise, on the synthetic task's cell questions)."""

import statistics

import torch

from pipeline.model.selection import head_scores
from pipeline.quality.reference import capture_cross_probs
from pipeline.quality.synthetic import CELL, Sample
from pipeline.types import PreparedPrompt


def object_tokens(sample: Sample, tokens_per_tile: int, patch_size: int) -> torch.Tensor:
    """Indices (into one image's tiles x tokens_per_tile tokens) of the patch tokens covering the asked object's
    cell. The grid's cells are CELL px, 2 x 2 to a tile, tiles in row-major order; token 0 of a tile is its class
    token."""
    row, col = sample.target
    tiles_wide = sample.grid[1] // 2
    side, per_cell = round((tokens_per_tile - 1) ** 0.5), CELL // patch_size
    tile = ((row - 1) // 2) * tiles_wide + (col - 1) // 2
    top, left = ((row - 1) % 2) * per_cell, ((col - 1) % 2) * per_cell
    patches = [(top + r) * side + left + c for r in range(per_cell) for c in range(per_cell)]
    return tile * tokens_per_tile + 1 + torch.tensor(patches)


@torch.inference_mode()
def target_share(model, prepared: PreparedPrompt, sample: Sample, first_cross: int) -> tuple[float, float]:
    """(share of the first cross-attention layer's head-summed attention on the object's tokens, the share a
    uniform spread over the image's real tokens would put there). Scores as the trimmer computes them."""
    probs = capture_cross_probs(model, prepared.hf_inputs(), [first_cross])[first_cross]
    tiles = prepared.cross_attention_mask.shape[-1]
    per_tile = probs.shape[-1] // tiles
    visible = prepared.token_visible(per_tile)
    scores = head_scores(probs, visible).sum(dim=0)
    valid = prepared.token_valid(per_tile)[0]
    assert valid.sum() == (sample.grid[0] // 2) * (sample.grid[1] // 2) * per_tile, "tile layout is not the grid's"
    target = object_tokens(sample, per_tile, model.config.vision_config.patch_size)
    return (scores[target].sum() / scores[valid].sum()).item(), len(target) / valid.sum().item()


def attention_share(pipe, samples: list[Sample]) -> dict:
    """Mean over the samples that ask about one cell (what / colour / where) of target_share, overall and per
    kind; `ratio` is share / uniform (1 = the first layer does not prefer the asked object)."""
    rows = {}
    for s in samples:
        if s.target is not None:
            share = target_share(pipe.loaded.model, pipe.prepare(s.prompt, [s.image]), s, pipe.loaded.first_cross)
            rows.setdefault(s.kind, []).append(share)
    every = [x for v in rows.values() for x in v]

    def summary(pairs):
        share, uniform = statistics.mean(p[0] for p in pairs), statistics.mean(p[1] for p in pairs)
        return {"n": len(pairs), "share": round(share, 4), "uniform": round(uniform, 4),
                "ratio": round(share / uniform, 2)}

    return {**summary(every), "by_kind": {k: summary(v) for k, v in sorted(rows.items())}}

"""The attention-share measure: its object tokens are the asked cell's patches, and its shares are shares."""

import dataclasses

from pipeline.quality.attention_share import attention_share, object_tokens
from pipeline.quality.synthetic import generate_samples


def test_object_tokens_cover_exactly_the_cells_holding_a_shape(tiny_pipeline):
    """On every layout: a cell's tokens' pixels vary (a shape is drawn) iff the layout puts an object there."""
    pipe = tiny_pipeline
    patch = pipe.loaded.model.config.vision_config.patch_size
    layouts = set()
    for s in generate_samples(40, seed=31):
        prepared = pipe.prepare(s.prompt, [s.image])
        tiles = prepared.pixel_values[0, 0]  # (tiles, 3, H, W)
        side = tiles.shape[-1] // patch
        per_tile = side * side + 1
        occupied = {(o[0], o[1]) for o in s.objects}
        for r in range(1, s.grid[0] + 1):
            for c in range(1, s.grid[1] + 1):
                pixels = []
                for i in object_tokens(dataclasses.replace(s, target=(r, c)), per_tile, patch).tolist():
                    t, p = divmod(i, per_tile)
                    pr, pc = divmod(p - 1, side)
                    pixels.append(tiles[t, :, pr * patch:(pr + 1) * patch, pc * patch:(pc + 1) * patch])
                drawn = any(px.std() > 0.05 for px in pixels)
                assert drawn == ((r, c) in occupied), (s.id, s.grid, (r, c))
        layouts.add(s.grid)
    assert len(layouts) >= 5


def test_attention_share_is_a_share(tiny_pipeline):
    samples = generate_samples(12, seed=5)
    asked = [s for s in samples if s.target is not None]
    out = attention_share(tiny_pipeline, samples)
    assert out["n"] == len(asked) == sum(k["n"] for k in out["by_kind"].values()) > 0
    assert 0 < out["share"] < 1
    # a cell is 4 x 4 of a tile's 65 tokens
    uniform = sum(16 / (65 * s.grid[0] * s.grid[1] // 4) for s in asked) / len(asked)
    assert abs(out["uniform"] - uniform) < 1e-4

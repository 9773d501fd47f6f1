"""Seeded synthetic visual QA: coloured shapes on a grid of 1 to 4 tiles; questions on one cell or the whole image.

Used to train and evaluate a tiny mllama whose attention is meaningful (scripts/train_tiny_vqa.py).
"""

import io
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TILE = 64  # image processor tile size; each tile holds 2x2 grid cells of CELL px (4x4 patches of 8 px)
CELL = TILE // 2
SIZE = 24  # shape size in px; fixed and centred so each shape makes the same few patch patterns
LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (1, 4), (4, 1)]  # (tile rows, tile cols)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 205, 30)}
SHAPES = ["square", "circle", "triangle"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
KINDS = ["what", "colour", "where", "count"]
KIND_WEIGHTS = [0.375, 0.15, 0.375, 0.1]
MAX_OBJECTS = 8


@dataclass
class Sample:
    id: str
    image: Image.Image
    prompt: str
    answer: str
    kind: str = ""  # what | colour | where | count
    grid: tuple = (0, 0)  # (rows, cols) of CELL-px cells
    objects: list = field(default_factory=list)  # [(row, col, colour, shape)], 1-based row/col
    target: tuple | None = None  # (row, col) of the cell the answer lives in; None for whole-image questions


def draw_image(grid: tuple, objects: list, rng: random.Random) -> Image.Image:
    """Draw each (row, col, colour, shape) object centred in its cell (SIZE px), with a jittered tint."""
    rows, cols = grid
    grey = rng.randint(215, 250)
    img = Image.new("RGB", (cols * CELL, rows * CELL), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    for row, col, colour, shape in objects:
        x0, y0 = (col - 1) * CELL + (CELL - SIZE) // 2, (row - 1) * CELL + (CELL - SIZE) // 2
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[colour])
        box = [x0, y0, x0 + SIZE - 1, y0 + SIZE - 1]
        if shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon([(x0 + SIZE / 2, y0), (x0, y0 + SIZE - 1), (x0 + SIZE - 1, y0 + SIZE - 1)], fill=fill)
    return img


def ask(kind: str, objects: list, rng: random.Random) -> tuple[str, str, tuple | None]:
    """Pick a question of this kind about the layout: (prompt, answer, target cell or None)."""
    row, col, colour, shape = rng.choice(objects)
    where = f"row {NUMBERS[row]} column {NUMBERS[col]}"
    if kind == "what":
        return f"what is the shape at {where}?", f"{colour} {shape}", (row, col)
    if kind == "colour":
        return f"what colour is the shape at {where}?", colour, (row, col)
    if kind == "where":
        return f"where is the {colour} {shape}?", where, (row, col)
    count = sum(o[3] == shape for o in objects)
    return f"how many {shape}s are there?", NUMBERS[count], None


def answer_from_layout(prompt: str, objects: list) -> str:
    """Recompute the answer of a prompt from layout metadata alone (used by tests)."""
    words = prompt.rstrip("?").split()
    if words[0] == "where":
        hit = [o for o in objects if (o[2], o[3]) == (words[-2], words[-1])]
        assert len(hit) == 1, "where-questions ask about a unique object"
        return f"row {NUMBERS[hit[0][0]]} column {NUMBERS[hit[0][1]]}"
    if words[0] == "how":
        return NUMBERS[sum(o[3] + "s" == words[2] for o in objects)]
    row, col = NUMBERS.index(words[-3]), NUMBERS.index(words[-1])
    (obj,) = [o for o in objects if (o[0], o[1]) == (row, col)]
    return obj[2] if words[1] == "colour" else f"{obj[2]} {obj[3]}"


def make_sample(rng: random.Random, sample_id: str, max_objects: int = MAX_OBJECTS, max_tiles: int = 4) -> Sample:
    """One image of at most max_tiles tiles with 1..max_objects distinct (colour, shape) objects in distinct
    cells, and one question."""
    th, tw = rng.choice([lay for lay in LAYOUTS if lay[0] * lay[1] <= max_tiles])
    grid = (2 * th, 2 * tw)
    cells = [(r, c) for r in range(1, grid[0] + 1) for c in range(1, grid[1] + 1)]
    n = rng.randint(1, min(max_objects, len(cells)))
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    objects = sorted((r, c, col, shp) for (r, c), (col, shp) in zip(rng.sample(cells, n), kinds))
    kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
    prompt, answer, target = ask(kind, objects, rng)
    return Sample(sample_id, draw_image(grid, objects, rng), prompt, answer, kind, grid, objects, target)


def generate_samples(n: int, seed: int, max_objects: int = MAX_OBJECTS, max_tiles: int = 4) -> list[Sample]:
    """n samples, deterministic per (seed, max_objects, max_tiles); smaller limits make a training curriculum."""
    rng = random.Random(seed)
    return [make_sample(rng, f"s{seed}-{i}", max_objects, max_tiles) for i in range(n)]


EXAMPLE_GRID = (2, 4)  # two tiles wide
EXAMPLE_OBJECTS = [(1, 1, "red", "square"), (1, 3, "blue", "circle"), (2, 2, "green", "triangle"),
                   (2, 4, "yellow", "square")]


def example_image() -> Image.Image:
    """The README's example picture, pipeline/assets/example.png: four shapes on a 2x4 grid of cells."""
    return draw_image(EXAMPLE_GRID, EXAMPLE_OBJECTS, random.Random(0))


def chat_messages(prompt: str) -> list[dict]:
    """One user message, image first, then the question (the Llama-3.2-Vision layout)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Seeded uniform noise: distinct pictures for tests and benchmarks, where content does not matter."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(samples: list[Sample], path: str | Path) -> None:
    """Columns id, prompt (question text), image (PNG bytes), answer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": pa.array([s.id for s in samples], pa.string()),
        "prompt": pa.array([s.prompt for s in samples], pa.string()),
        "image": pa.array([png_bytes(s.image) for s in samples], pa.binary()),
        "answer": pa.array([s.answer for s in samples], pa.string()),
    })
    pq.write_table(table, str(path))

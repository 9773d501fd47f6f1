"""Synthetic shapes VQA: determinism, answers consistent with the drawn image, the trained tiny checkpoint."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.quality.synthetic import (
    CELL,
    COLOURS,
    EXAMPLE_OBJECTS,
    NUMBERS,
    TILE,
    answer_from_layout,
    example_image,
    generate_samples,
    png_bytes,
    write_parquet,
)

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "pipeline" / "assets" / "tiny-mllama-vqa"


def test_deterministic_per_seed():
    a, b, c = generate_samples(12, seed=3), generate_samples(12, seed=3), generate_samples(12, seed=4)
    assert [(s.id, s.prompt, s.answer, png_bytes(s.image)) for s in a] == \
        [(s.id, s.prompt, s.answer, png_bytes(s.image)) for s in b]
    assert [png_bytes(s.image) for s in a] != [png_bytes(s.image) for s in c]
    assert [(s.prompt, s.answer) for s in a] != [(s.prompt, s.answer) for s in c]


def test_sizes_span_one_to_four_tiles():
    samples = generate_samples(200, seed=5)
    tiles = {(s.image.height // TILE) * (s.image.width // TILE) for s in samples}
    assert tiles == {1, 2, 3, 4}
    assert all(s.image.width % TILE == 0 and s.image.height % TILE == 0 for s in samples)
    assert {s.kind for s in samples} == {"what", "colour", "where", "count"}


def cell_content(image: Image.Image, row: int, col: int):
    """(colour, shape) drawn in a cell, read from pixels; None when the cell is background only."""
    px = np.asarray(image, dtype=np.int32)[(row - 1) * CELL:row * CELL, (col - 1) * CELL:col * CELL]
    ink = np.abs(px - px[0, 0]).sum(-1) > 60
    if ink.sum() < 50:
        return None
    ys, xs = np.nonzero(ink)
    fill = ink.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    mean = px[ink].mean(0)
    colour = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())
    return colour, shape


def test_answers_consistent_with_drawn_image():
    for s in generate_samples(60, seed=6):
        assert answer_from_layout(s.prompt, s.objects) == s.answer
        rows, cols = s.grid
        assert (s.image.height, s.image.width) == (rows * CELL, cols * CELL)
        drawn = {(r, c): cell_content(s.image, r, c) for r in range(1, rows + 1) for c in range(1, cols + 1)}
        expected = {(r, c): None for r, c in drawn} | {(r, c): (col, shp) for r, c, col, shp in s.objects}
        assert drawn == expected, s.id
        if s.target is not None:
            assert s.target in {(o[0], o[1]) for o in s.objects}


def test_write_parquet(tmp_path):
    import pyarrow.parquet as pq

    samples = generate_samples(5, seed=7)
    write_parquet(samples, tmp_path / "s.parquet")
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column_names == ["id", "prompt", "image", "answer"]
    assert [str(t) for t in table.schema.types] == ["string", "string", "binary", "string"]
    rows = table.to_pylist()
    assert [r["answer"] for r in rows] == [s.answer for s in samples]
    back = Image.open(io.BytesIO(rows[2]["image"]))
    assert np.array_equal(np.asarray(back), np.asarray(samples[2].image))


CHECK = """
import json, sys, torch
from transformers import AutoProcessor, MllamaForConditionalGeneration
sys.path.insert(0, sys.argv[2])
from pipeline.quality.reference import follow_reference
from pipeline.quality.synthetic import chat_messages, generate_samples
torch.set_num_threads(1)
processor = AutoProcessor.from_pretrained(sys.argv[1])
model = MllamaForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
follow_reference(model)  # as crosstrim serves it: Meta's reference where HF departs (README)
hits = []
for s in generate_samples(8, seed=424242):
    text = processor.apply_chat_template(chat_messages(s.prompt), add_generation_prompt=True)
    inputs = processor(images=s.image, text=text, return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=12)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    hits.append(answer.strip() == s.answer)
print(json.dumps(hits))
"""


def test_trained_checkpoint_loads_offline_and_answers():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHECK, str(CKPT), str(ROOT)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    hits = json.loads(out.stdout.strip().splitlines()[-1])
    assert sum(hits) > len(hits) / 2, hits
    for name in ["config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "preprocessor_config.json"]:
        assert (CKPT / name).exists(), name
    assert sum(f.stat().st_size for f in CKPT.iterdir()) <= 12 * 2**20


def test_readme_example_is_answered_by_the_demo_model():
    """pipeline/assets/example.png is the task's picture, and the demo model (local.yaml's default, trimmed at
    the default policy) answers every cell question the README suggests about it."""
    from pipeline.config import ModelConfig, TrimConfig
    from pipeline.engine.sampling import SamplingParams
    from pipeline.inprocess import Pipeline

    image = Image.open(ROOT / "pipeline" / "assets" / "example.png").convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(example_image()))
    pipe = Pipeline(ModelConfig(source="bundled:tiny-mllama-vqa"), trim=TrimConfig())
    wrong = []
    for row, col, colour, shape in EXAMPLE_OBJECTS:
        where = f"row {NUMBERS[row]} column {NUMBERS[col]}"
        for prompt, answer in [(f"what is the shape at {where}?", f"{colour} {shape}"),
                               (f"what colour is the shape at {where}?", colour),
                               (f"where is the {colour} {shape}?", where)]:
            g = pipe.generate(prompt, [image], SamplingParams(max_tokens=8))
            assert g.kept_tokens < g.visual_tokens
            if g.text != answer:
                wrong.append((prompt, g.text, answer))
    assert wrong == []

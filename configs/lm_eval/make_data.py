"""Writes the lm-evaluation-harness tasks' local data (shapes_kind.jsonl, shapes_vqa.jsonl) from the synthetic
shapes generator (pipeline/quality/synthetic.py) at a seed no training or held-out set uses. Run from the repository
root: python configs/lm_eval/make_data.py"""

import json
import random
from pathlib import Path

from pipeline.quality.synthetic import generate_samples

HERE = Path(__file__).parent
SEED = 5_000_031  # train_tiny_vqa.py trains on 1_000_000 + k and holds out 2_000_000 + k
N = 64


def kind_rows(samples) -> list[dict]:
    """shapes_kind: the question alone (no image) and one answer of each kind; the gold is the one of the kind the
    question asks for, so a text-only model can tell it by the question's form."""
    rng = random.Random(SEED)
    by_kind = {}
    for s in samples:
        by_kind.setdefault(s.kind, []).append(s.answer)
    rows = []
    for s in samples:
        choices = [s.answer] + [rng.choice(by_kind[k]) for k in sorted(by_kind) if k != s.kind]
        rng.shuffle(choices)
        rows.append({"id": s.id, "prompt": s.prompt, "kind": s.kind, "gold": choices.index(s.answer),
                     "choices": [c + "<|eot_id|>" for c in choices]})  # the answer's end scored too
    return rows


def vqa_rows(samples) -> list[dict]:
    """shapes_vqa: the question, its answer, and the layout its image is drawn from (utils.doc_to_image)."""
    return [{"id": s.id, "prompt": s.prompt, "answer": s.answer, "grid": list(s.grid),
             "objects": [list(o) for o in s.objects], "seed": i} for i, s in enumerate(samples)]


def main() -> None:
    samples = generate_samples(N, SEED)
    for name, rows in (("shapes_kind", kind_rows(samples)), ("shapes_vqa", vqa_rows(samples))):
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()

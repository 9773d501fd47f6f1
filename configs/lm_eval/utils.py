"""The shapes tasks' image: drawn from the layout in the data row, as pipeline/quality/synthetic.py draws it."""

import random

from pipeline.quality.synthetic import draw_image


def doc_to_image(doc: dict) -> list:
    objects = [tuple(o) for o in doc["objects"]]
    return [draw_image(tuple(doc["grid"]), objects, random.Random(doc["seed"]))]

"""Shared test inputs: generated images of 1, 2 and 4 tiles and a few prompts."""

from PIL import Image

from pipeline.quality.synthetic import noise_image

PROMPTS = ["What colour is the square?", "describe this image please", "where is the red one", "count the shapes"]


image = noise_image


def images() -> dict[str, Image.Image]:
    # The tiny model's tiles are 64 px: 64x64 is one tile, 100x40 two, 128x128 four.
    return {"1tile": image(64, 64, 0), "2tile": image(100, 40, 1), "4tile": image(128, 128, 2)}

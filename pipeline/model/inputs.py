"""Turn a chat (text and images) into model inputs with the checkpoint's own chat template and processor."""

import io
import warnings
from pathlib import Path

from PIL import Image

from pipeline.errors import InvalidRequest
from pipeline.types import PreparedPrompt

DEFAULT_MAX_PIXELS = 4096 * 4096


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image") -> Image.Image:
    """Decode image bytes to RGB, refusing undecodable data and oversized or bomb images."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise InvalidRequest(f"{what} is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
            img.load()
            return img.convert("RGB")
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(f"{what} is too large to decode: {exc}") from exc
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise InvalidRequest(f"{what} could not be decoded as an image ({type(exc).__name__}: {exc})") from exc


def read_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"image file {str(path)!r} does not exist")
    return decode_image(path.read_bytes(), max_pixels, what=f"image file {str(path)!r}")


def user_message(text: str, num_images: int) -> list[dict]:
    """One user message with the images first, as Llama-3.2-Vision expects."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def prepare_prompt(
    processor, messages: list[dict], images: list[Image.Image], max_images: int, max_prompt_tokens: int
) -> PreparedPrompt:
    """Format `messages` with the chat template (generation prompt added) and run the processor."""
    if len(images) > max_images:
        raise InvalidRequest(f"{len(images)} images in one prompt; this deployment accepts at most {max_images}")
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = processor.image_token
    if text.count(image_token) != len(images):
        raise InvalidRequest(f"the prompt has {text.count(image_token)} image slots but {len(images)} images")
    try:
        out = processor(text=text, images=images or None, add_special_tokens=False, return_tensors="pt")
    except ValueError as exc:
        raise InvalidRequest(f"the processor refused the input: {exc}") from exc
    input_ids = out["input_ids"][0]
    if input_ids.numel() > max_prompt_tokens:
        raise InvalidRequest(f"prompt is {input_ids.numel()} tokens; the limit is {max_prompt_tokens}")
    if not images:
        return PreparedPrompt(input_ids=input_ids)
    return PreparedPrompt(
        input_ids=input_ids,
        pixel_values=out["pixel_values"],
        aspect_ratio_ids=out["aspect_ratio_ids"],
        aspect_ratio_mask=out["aspect_ratio_mask"],
        cross_attention_mask=out["cross_attention_mask"][0],
    )

"""Turn a chat (text and images) into model inputs with the checkpoint's own chat template and processor."""

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .errors import InvalidRequest

DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass
class PreparedPrompt:
    """Token ids plus, when there are images, the processor's pixel tensors and cross-attention mask."""

    input_ids: torch.Tensor  # (S,) long
    pixel_values: torch.Tensor | None = None  # (1, images, tiles, 3, H, W)
    aspect_ratio_ids: torch.Tensor | None = None  # (1, images)
    aspect_ratio_mask: torch.Tensor | None = None  # (1, images, tiles)
    cross_attention_mask: torch.Tensor | None = None  # (S, images, tiles), 1 where a row sees a tile

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else self.pixel_values.shape[1]

    def token_valid(self, tokens_per_tile: int) -> torch.Tensor:
        """(images, tiles * tokens_per_tile) bool: False for the tokens of padding tiles."""
        return self.aspect_ratio_mask[0].bool().repeat_interleave(tokens_per_tile, dim=1)

    def token_visible(self, tokens_per_tile: int) -> torch.Tensor:
        """(S, images * tiles * tokens_per_tile) bool: which visual tokens each prompt row sees, as HF expands
        the processor's tile mask."""
        mask = self.cross_attention_mask.bool()
        return mask.repeat_interleave(tokens_per_tile, dim=2).reshape(mask.shape[0], -1)

    def hf_inputs(self) -> dict:
        """The same inputs as HF's processor returns, batch of one (for the reference and tests)."""
        out = {"input_ids": self.input_ids[None], "attention_mask": torch.ones_like(self.input_ids)[None]}
        if self.pixel_values is not None:
            out.update(
                pixel_values=self.pixel_values,
                aspect_ratio_ids=self.aspect_ratio_ids,
                aspect_ratio_mask=self.aspect_ratio_mask,
                cross_attention_mask=self.cross_attention_mask[None],
            )
        return out


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

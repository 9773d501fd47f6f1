"""The ingress's preprocessing: chat messages -> checks, image fetching (ImageFetcher) and the processor -> PreparedPrompt."""

import asyncio
import threading

from pipeline.errors import InvalidRequest
from pipeline.model.inputs import decode_image, prepare_prompt
from pipeline.model.loader import load_processor
from pipeline.types import PreparedPrompt

from .api import Message, TextPart
from .config import AppConfig
from .faults import log
from .images import ImageFetcher, image_key

TEMPLATE_TOKENS_PER_MESSAGE = 4  # Llama 3's chat template wraps each message in at least 4 special tokens


def to_hf_messages(messages: list[Message]) -> tuple[list[dict], list[str]]:
    """HF chat-template messages (an {"type": "image"} slot per image part) and the image URLs in order."""
    out, urls = [], []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        content = []
        for part in m.content:
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            else:
                content.append({"type": "image"})
                urls.append(part.image_url.url)
        out.append({"role": m.role, "content": content})
    return out, urls


def message_texts(m: Message) -> list[str]:
    return [m.content] if isinstance(m.content, str) else [p.text for p in m.content if isinstance(p, TextPart)]


def prompt_chars(messages: list[Message]) -> int:
    return sum(len(text) for m in messages for text in message_texts(m))


def check_shape(messages: list[Message], max_messages: int, max_prompt_tokens: int) -> None:
    """Refuse before templating and tokenising: too many messages, the template alone past the token limit, text
    that is not Unicode (lone surrogates a JSON escape can carry)."""
    if len(messages) > max_messages:
        raise InvalidRequest(f"{len(messages)} messages; this deployment accepts at most {max_messages}")
    if len(messages) * TEMPLATE_TOKENS_PER_MESSAGE > max_prompt_tokens:
        raise InvalidRequest(f"{len(messages)} messages exceed the prompt limit of {max_prompt_tokens} tokens")
    for m in messages:
        for text in message_texts(m) + ([m.name] if m.name else []):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest("a message's text is not valid Unicode (a lone surrogate)") from None


class Preprocessor:
    """The processor alone (no weights) and the image fetcher of one ingress replica."""

    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self.processor = load_processor(cfg.model)
        # HF fast tokenizers raise "Already borrowed" when threads use one at once; images decode in parallel.
        self.lock = threading.Lock()
        self.fetcher = ImageFetcher(cfg)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    async def prepare(self, messages: list[Message]) -> tuple[PreparedPrompt, list[str]]:
        """The prompt and its images' feature-cache keys; an input this deployment refuses is an InvalidRequest."""
        hf_messages, urls = to_hf_messages(messages)
        max_images = self.cfg.model.max_images
        if len(urls) > max_images:
            raise InvalidRequest(f"{len(urls)} images in one request; this deployment accepts at most {max_images}")
        if prompt_chars(messages) > self.cfg.max_prompt_chars:
            raise InvalidRequest(f"the prompt is longer than {self.cfg.max_prompt_chars} characters")
        check_shape(messages, self.cfg.max_messages, self.cfg.model.max_prompt_tokens)
        blobs = await asyncio.gather(*(self.fetcher.fetch(u, f"image {i + 1}") for i, u in enumerate(urls)))
        prepared = await asyncio.to_thread(self._preprocess, hf_messages, blobs)
        return prepared, [image_key(b) for b in blobs]

    def _preprocess(self, messages: list[dict], blobs: list[bytes]) -> PreparedPrompt:
        images = [decode_image(b, self.cfg.max_image_pixels, f"image {i + 1}") for i, b in enumerate(blobs)]
        m = self.cfg.model
        try:
            with self.lock:
                return prepare_prompt(self.processor, messages, images, m.max_images, m.max_prompt_tokens)
        except InvalidRequest:
            raise
        except Exception as exc:  # the processor choking on an odd input is the input's fault
            log.warning("preprocessing refused an input: %s: %s", type(exc).__name__, exc)
            raise InvalidRequest("could not preprocess the request's text or images") from exc

"""The ingress's preprocessing: chat messages -> checks, image fetching (ImageFetcher) and the processor -> PreparedPrompt."""

import asyncio
import threading

import torch

from pipeline.errors import InvalidRequest
from pipeline.model.inputs import decode_image, prepare_prompt
from pipeline.model.loader import load_processor
from pipeline.model.tools import render_tools
from pipeline.types import PreparedPrompt

from .api import Message, TextPart
from .config import AppConfig
from .faults import log
from .images import ImageFetcher, image_key

TEMPLATE_TOKENS_PER_MESSAGE = 4  # Llama 3's chat template wraps each message in at least 4 special tokens


def to_hf_messages(messages: list[Message], tools: list[dict] | None = None) -> tuple[list[dict], list[str]]:
    """HF chat-template messages (an {"type": "image"} slot per image part; developer messages as system ones; tools
    and tool turns written in Llama 3.x's JSON format) and the image URLs in order."""
    out, urls = [], []
    for m in messages:
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for the same instructions
        msg = {"role": role, "content": m.content or ""}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if isinstance(m.content, list):
            msg["content"] = []
            for part in m.content:
                if isinstance(part, TextPart):
                    msg["content"].append({"type": "text", "text": part.text})
                else:
                    msg["content"].append({"type": "image"})
                    urls.append(part.image_url.url)
        out.append(msg)
    return render_tools(out, tools), urls


def message_texts(m: Message) -> list[str]:
    if m.content is None:
        return [c.function.arguments for c in m.tool_calls or []]
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

    async def prepare(self, messages: list[Message], tools: list[dict] | None = None
                      ) -> tuple[PreparedPrompt, list[str]]:
        """The prompt and its images' feature-cache keys; an input this deployment refuses is an InvalidRequest."""
        hf_messages, urls = to_hf_messages(messages, tools)
        max_images = self.cfg.model.max_images
        if len(urls) > max_images:
            raise InvalidRequest(f"{len(urls)} images in one request; this deployment accepts at most {max_images}")
        if prompt_chars(messages) > self.cfg.max_prompt_chars:
            raise InvalidRequest(f"the prompt is longer than {self.cfg.max_prompt_chars} characters")
        check_shape(messages, self.cfg.max_messages, self.cfg.model.max_prompt_tokens)
        blobs = await asyncio.gather(*(self.fetcher.fetch(u, f"image {i + 1}") for i, u in enumerate(urls)))
        prepared = await asyncio.to_thread(self._preprocess, hf_messages, blobs)
        return prepared, [image_key(b) for b in blobs]

    async def prepare_text(self, prompt: str | list[int]) -> tuple[PreparedPrompt, list[str]]:
        """A text completion's prompt: a string tokenised with <|begin_of_text|>, or token ids as they are."""
        if isinstance(prompt, str):
            if len(prompt) > self.cfg.max_prompt_chars:
                raise InvalidRequest(f"the prompt is longer than {self.cfg.max_prompt_chars} characters")
            ids = await asyncio.to_thread(self.tokenize, prompt, True)
        else:
            ids = prompt
            bad = [t for t in ids if not 0 <= t < len(self.tokenizer)]
            if bad:
                raise InvalidRequest(f"prompt token ids {bad[:5]} are outside the vocabulary of {len(self.tokenizer)}")
        if self.tokenizer.convert_tokens_to_ids(self.processor.image_token) in ids:
            raise InvalidRequest("a text completion's prompt cannot hold the image token")
        if len(ids) > self.cfg.model.max_prompt_tokens:
            raise InvalidRequest(f"prompt is {len(ids)} tokens; the limit is {self.cfg.model.max_prompt_tokens}")
        return PreparedPrompt(input_ids=torch.tensor(ids, dtype=torch.long)), []

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        with self.lock:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def render(self, messages: list[Message], add_generation_prompt: bool) -> list[int]:
        """/tokenize's chat form: the template's tokens, an image part as its one image token (no pixels)."""
        hf_messages, _ = to_hf_messages(messages)
        with self.lock:
            text = self.processor.apply_chat_template(hf_messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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

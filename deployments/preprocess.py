"""The ingress's preprocessing: chat messages -> checks, image fetching (ImageFetcher) and the processor -> PreparedPrompt."""

import asyncio
import copy
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
from .validation import Vocab, check_text_size, check_token_ids

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


def check_shape(messages: list[Message], max_messages: int, max_prompt_tokens: int, max_chars: int) -> None:
    """Refuse before templating and tokenising: too many messages, the template alone past the token limit, too
    much text (text that is not Unicode was refused before: deployments/validation.py)."""
    if len(messages) > max_messages:
        raise InvalidRequest(f"{len(messages)} messages; this deployment accepts at most {max_messages}",
                             param="messages")
    if len(messages) * TEMPLATE_TOKENS_PER_MESSAGE > max_prompt_tokens:
        raise InvalidRequest(f"{len(messages)} messages exceed the prompt limit of {max_prompt_tokens} tokens",
                             param="messages")
    if prompt_chars(messages) > max_chars:
        raise InvalidRequest(f"the prompt is longer than {max_chars} characters", param="messages")


class Preprocessor:
    """The processor alone (no weights) and the image fetcher of one ingress replica."""

    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self.processor = load_processor(cfg.model)
        # HF fast tokenizers raise "Already borrowed" when threads use one at once; images decode in parallel.
        self.lock = threading.Lock()
        # Text alone (/tokenize, /detokenize, text completions) on a copy with its own lock: never waits on images.
        self.text_tokenizer, self.text_lock = copy.deepcopy(self.processor.tokenizer), threading.Lock()
        image_id = self.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        self.vocab = Vocab(len(self.tokenizer), frozenset({image_id}))
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
            raise InvalidRequest(f"{len(urls)} images in one request; this deployment accepts at most {max_images}",
                                 param="messages")
        self.check_messages(messages)
        blobs = await asyncio.gather(*(self.fetcher.fetch(u, f"image {i + 1}") for i, u in enumerate(urls)))
        prepared = await asyncio.to_thread(self._preprocess, hf_messages, blobs)
        return prepared, [image_key(b) for b in blobs]

    async def prepare_text(self, prompt: str | list[int]) -> tuple[PreparedPrompt, list[str]]:
        """A text completion's prompt: a string tokenised with <|begin_of_text|>, or token ids as they are."""
        limit = self.cfg.model.max_prompt_tokens
        if isinstance(prompt, str):
            check_text_size(prompt, self.cfg.max_prompt_chars, "prompt")
            ids = await asyncio.to_thread(self.tokenize, prompt, True)
        else:
            check_token_ids(prompt, self.vocab, "prompt", max_count=limit)
            ids = prompt
        if self.vocab.never_emitted.intersection(ids):
            raise InvalidRequest("a text completion's prompt cannot hold the image token", param="prompt")
        if len(ids) > limit:
            raise InvalidRequest(f"prompt is {len(ids)} tokens; the limit is {limit}", param="prompt")
        return PreparedPrompt(input_ids=torch.tensor(ids, dtype=torch.long)), []

    def check_messages(self, messages: list[Message]) -> None:
        check_shape(messages, self.cfg.max_messages, self.cfg.model.max_prompt_tokens, self.cfg.max_prompt_chars)

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """Blocking (call it in a thread); on the text tokenizer."""
        with self.text_lock:
            return self.text_tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        """Blocking (call it in a thread); on the text tokenizer."""
        with self.text_lock:
            return self.text_tokenizer.decode(ids)

    def render(self, messages: list[Message], add_generation_prompt: bool) -> list[int]:
        """/tokenize's chat form: the template's tokens, an image part as its one image token (no pixels).
        Blocking (call it in a thread); the template is rendered in Python, tokenised on the text tokenizer."""
        hf_messages, _ = to_hf_messages(messages)
        with self.text_lock:
            text = self.processor.apply_chat_template(hf_messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
            return self.text_tokenizer(text, add_special_tokens=False)["input_ids"]

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

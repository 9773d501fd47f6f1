"""A request inside the decoder engine: its prompt, image state (resume state until the prefill), sampling state and
KV pages."""

import time
from enum import Enum, auto

from pipeline.engine.page_table import PageTable
from pipeline.engine.sampling import SamplingParams
from pipeline.engine.swap import SwappedKV
from pipeline.engine.token_mask import TokenMask
from pipeline.types import DecodeRequest, ImageState, PromptLogprob, ResumeState


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    SWAPPED = auto()  # preempted: its K/V in host memory until pages free up
    FINISHED = auto()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 image: ImageState | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.image = image  # None for a text-only prompt: the decoder prefills it from the first layer
        # A generated token sees what the prompt's last row sees (HF repeats that mask row): computed once, here,
        # and whether it is every kept token known on the host, so no decode step reads it back.
        self.cross_mask = None if image is None else image.row_visibility[-1][image.kept_image]  # (kept,) bool
        self.cross_sees_all = image is None or bool(self.cross_mask.all())
        self.resume: ResumeState | None = None  # the prefill's input, read chunk by chunk, dropped after the last
        # Its first row in the resume state: the rows before it (blind prefix rows the trimmer's prefix cache held)
        # come from the decoder's prefix cache, or are prefilled from the first layer like a text-only prompt's.
        self.resume_start = 0
        self.prefilled = 0  # prompt rows whose K/V is in its pages: the (chunked) prefill's progress
        # Prefix caching: hashes of its cacheable full pages (its text-only prompt's, or its rows before the first
        # image token), and the prompt rows it took from the cache at admission (its prefill starts after them).
        self.page_hashes: list[bytes] = []
        self.cached_tokens = 0
        self.status = Status.WAITING
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        # params.prompt_logprobs set: entry i scores prompt token i + 1, written by the prefill (prompt_logprobs.py)
        self.prompt_logprobs: list[PromptLogprob | None] | None = None if params.prompt_logprobs is None else []
        self.text = ""  # detokenized output, cut at a stop string: LLMEngine.step() keeps it (streams carry theirs)
        self.finish_reason: str | None = None
        self.pages: PageTable | None = None  # while running: its KV pages
        self.swapped: SwappedKV | None = None  # while preempted: its K/V on the host
        self.index = 0  # which of the request's n completions; index 0 is the one prefilled
        self.siblings: list[Sequence] = []  # on index 0: the n - 1 forked after its prefill
        self.logit_mask: TokenMask | None = None  # a per-row constraint (structured output) the sampler applies
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.kept_at_admission = 0 if image is None else image.num_kept
        self.shed_at: int | None = None  # elastic: the output token from which it attends to fewer kept tokens

    @classmethod
    def from_request(cls, request_id: str, request: DecodeRequest, params: SamplingParams) -> "Sequence":
        seq = cls(request_id, request.prompt_token_ids, params, request.image)
        seq.resume = request.resume
        seq.resume_start = 0 if request.resume is None else request.resume.start
        return seq

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def cacheable_rows(self) -> int:
        """Prompt rows whose K/V depends on their tokens alone: all of a text-only prompt, the blind prefix of an
        image prompt (after the first image token the K/V depends on the image, and on the trimming)."""
        return self.prompt_len if self.image is None else self.image.prefix_len

    def runs_as_text(self, end: int) -> bool:
        """Prompt rows ending at `end` run from the first layer, skipping cross-attention (a text-only prompt's, or
        blind rows the resume state does not carry), rather than resume after the first cross-attention layer."""
        return self.image is None or end <= self.resume_start

    @property
    def prefilling(self) -> bool:
        """Part of its prompt is not yet in its pages (it samples its first token after the last chunk)."""
        return self.prefilled < self.prompt_len

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    @property
    def max_self_tokens(self) -> int:
        """Self-attention K/V positions it may ever hold: the prompt and every token it may generate."""
        return self.prompt_len + self.params.max_tokens

    @property
    def completions_held(self) -> int:
        """Completions this sequence stands for in admission (running slots, worst cases): the prefilled one holds
        its siblings' places until they fork from it after the prompt's last chunk; each sibling holds its own."""
        return self.params.n - len(self.siblings) if self.index == 0 else 1

    @property
    def cross_tokens(self) -> int:
        return 0 if self.image is None else self.image.num_kept

    @property
    def sheddable_tokens(self) -> int:
        """Kept tokens it may still shed (elastic, decoding, its pages its own): down to its floor, once."""
        image = self.image
        if (image is None or image.floor_tokens is None or self.shed_at is not None or self.prefilling
                or self.params.n > 1 or self.status != Status.RUNNING):
            return 0
        return max(image.num_kept - image.floor_tokens, 0)

    def shed_to(self, keep: int) -> None:
        """Attend to its first `keep` kept tokens (the most important) from its next token on."""
        self.image = self.image.first(keep)
        self.cross_mask = self.cross_mask[:keep]
        self.cross_sees_all = bool(self.cross_mask.all())
        self.shed_at = len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

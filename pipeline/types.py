"""The stages' hand-off types: what crosses from one stage to the next (prompt -> features -> decode request ->
outputs). Both sides import them from here, so no stage depends on another stage's module."""

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class PreparedPrompt:
    """Token ids plus, when there are images, the processor's pixel tensors and cross-attention mask."""

    input_ids: torch.Tensor  # (S,) long
    pixel_values: torch.Tensor | None = None  # (1, images, tiles, 3, H, W)
    aspect_ratio_ids: torch.Tensor | None = None  # (1, images)
    aspect_ratio_mask: torch.Tensor | None = None  # (1, images, tiles)
    cross_attention_mask: torch.Tensor | None = None  # (S, images, tiles), 1 where a row sees a tile
    # vLLM's cache_salt: which prefix-cached rows the prompt may share (only with prompts of the same salt)
    cache_salt: str | None = None

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else self.pixel_values.shape[1]

    @property
    def blind_prefix(self) -> int:
        """Rows before the first image token (they see no image): what the prefix caches may hold of the prompt."""
        return int(self.cross_attention_mask.bool().flatten(1).any(dim=1).long().argmax())

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


@dataclass
class VisualFeatures:
    """Projected features of a prompt's images: what the cross-attention layers read."""

    features: torch.Tensor  # (images, tiles * patches, hidden), padding tiles included
    token_valid: torch.Tensor  # (images, tiles * patches) bool: False for tokens of padding tiles

    @property
    def num_images(self) -> int:
        return self.features.shape[0]

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


def _tensor_fields(obj) -> tuple[dict[str, torch.Tensor], dict]:
    """A dataclass's fields split into (tensors, plain values)."""
    tensors, plain = {}, {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        (tensors if isinstance(value, torch.Tensor) else plain)[f.name] = value
    return tensors, plain


def map_tensors(obj, fn):
    """A copy of a hand-off dataclass with `fn` applied to every tensor in it, nested ones too (moving to a device,
    making contiguous)."""
    def apply(value):
        if isinstance(value, torch.Tensor):
            return fn(value)
        return map_tensors(value, fn) if dataclasses.is_dataclass(value) else value

    return dataclasses.replace(obj, **{f.name: apply(getattr(obj, f.name)) for f in dataclasses.fields(obj)})


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class ImageState:
    """What a sequence with images keeps for its whole life: which visual tokens were kept and who sees them."""

    kept_image: torch.Tensor  # (kept,) which image each kept token comes from
    kept_index: torch.Tensor  # (kept,) its position among that image's tiles * patches tokens
    row_visibility: torch.Tensor  # (S, images) bool: which images each prompt row sees
    visual_tokens: list[int]  # non-padding tokens per image
    kept_tokens: list[int]  # kept tokens per image
    kv_bytes_per_visual_token: int  # K and V of one visual token across all cross-attention layers
    tokens_per_image: int  # tiles * patches: global position = image * tokens_per_image + index
    # Rows before the first image token see no image: they get no cross-attention output (Meta's reference).
    prefix_len: int = 0
    # Elastic trimming (docs/elastic.md): the kept tokens are stored best first and the decoder may shed the tail
    # down to floor_tokens (None: never shed); the fraction the trimmer chose and the pool's pressure it saw.
    floor_tokens: int | None = None
    chosen_fraction: float | None = None
    pressure: float | None = None

    @property
    def kept_positions(self) -> torch.Tensor:
        """(kept,) global positions of the kept tokens, in the cross K/V's order."""
        return self.kept_image * self.tokens_per_image + self.kept_index

    @property
    def num_kept(self) -> int:
        return len(self.kept_image)

    @property
    def cross_kv_bytes(self) -> int:
        """Cross-attention K/V the decoder holds for this request (whether shipped or projected there)."""
        return self.num_kept * self.kv_bytes_per_visual_token

    @property
    def cross_kv_bytes_full(self) -> int:
        return sum(self.visual_tokens) * self.kv_bytes_per_visual_token

    @property
    def kept_fraction(self) -> float:
        return sum(self.kept_tokens) / sum(self.visual_tokens)

    def first(self, n: int) -> "ImageState":
        """The state after shedding all but the first (most important) n kept tokens."""
        kept_image = self.kept_image[:n]
        return dataclasses.replace(self, kept_image=kept_image, kept_index=self.kept_index[:n],
                                   kept_tokens=torch.bincount(kept_image, minlength=len(self.visual_tokens)).tolist())

    @property
    def nbytes(self) -> int:
        return _nbytes(_tensor_fields(self)[0].values())


@dataclass
class CrossKV:
    """The kept tokens' K/V in every cross-attention layer, as the trimmer projected them."""

    kv: torch.Tensor  # (cross_layers, 2, KVH, kept, hd)

    @property
    def tensor(self) -> torch.Tensor:
        return self.kv

    @property
    def nbytes(self) -> int:
        return _nbytes([self.kv])


@dataclass
class KeptFeatures:
    """The kept tokens' projected features (hidden floats a token); the decoder projects every layer's K/V."""

    features: torch.Tensor  # (kept, hidden)

    @property
    def tensor(self) -> torch.Tensor:
        return self.features

    @property
    def nbytes(self) -> int:
        return _nbytes([self.features])


CROSS_KINDS = {"kv": CrossKV, "features": KeptFeatures}  # TrimmerConfig's `ship` -> what crosses the hop


@dataclass
class ResumeState:
    """What the decoder's prefill consumes once to resume right after the first cross-attention layer."""

    hidden: torch.Tensor  # (S - start, hidden): the first cross-attention layer's output, prompt rows start..S
    self_kv: torch.Tensor  # (first_cross, 2, KVH, S - start, hd): self-attention K/V of the layers before it
    cross: CrossKV | KeptFeatures  # the kept tokens, as K/V or as features
    # Rows before `start` are not here: the trimmer took them from its prefix cache (pipeline/model/trimmer_cache.py).
    # They are blind-prefix rows (their K/V depends on their tokens alone): the decoder has them in its own prefix
    # cache or computes them from the tokens, as it does a text-only prompt's.
    start: int = 0

    @property
    def ship(self) -> str:
        return next(k for k, t in CROSS_KINDS.items() if isinstance(self.cross, t))

    @property
    def nbytes(self) -> int:
        return _nbytes([self.hidden, self.self_kv]) + self.cross.nbytes


@dataclass
class Payload:
    """A hand-off as tensors plus plain fields: what the Serve hops and the batch job's rows carry."""

    tensors: dict[str, torch.Tensor]
    fields: dict

    @property
    def nbytes(self) -> int:
        return _nbytes(self.tensors.values())

    def map_tensors(self, fn) -> "Payload":
        return Payload({k: fn(t) for k, t in self.tensors.items()}, self.fields)

    def as_dict(self) -> dict:
        """For torch.save(..., weights_only=True) and back with Payload(**d)."""
        return {"tensors": self.tensors, "fields": self.fields}


@dataclass
class DecodeRequest:
    """What the decoder is asked to run: the prompt's token ids and, for a prompt with images, its image state and
    the resume state its prefill consumes (a text-only prompt has neither and prefills from layer 0)."""

    prompt_token_ids: list[int]
    image: ImageState | None = None
    resume: ResumeState | None = None

    def __post_init__(self):
        if (self.image is None) != (self.resume is None):
            raise ValueError("a decode request carries an image state and a resume state together, or neither")
        if self.resume is not None and not 0 <= self.resume.start <= self.image.prefix_len:
            raise ValueError(f"resume state starts at row {self.resume.start}: only blind-prefix rows "
                             f"(before row {self.image.prefix_len}) may be left out")
        if self.resume is not None and len(self.resume.hidden) != self.prompt_len - self.resume.start:
            raise ValueError(f"resume state has {len(self.resume.hidden)} rows; the prompt has "
                             f"{self.prompt_len} from row {self.resume.start}")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_kept(self) -> int:
        return 0 if self.image is None else self.image.num_kept

    @property
    def nbytes(self) -> int:
        """Bytes handed to the decoder in all."""
        return self.to_payload().nbytes

    def to_payload(self) -> Payload:
        """Tensors named "image.<field>", "resume.<field>" and "resume.cross" (K/V or features, as `ship` says);
        plain fields: the prompt ids, the image state's counts, `ship`."""
        tensors, fields = {}, {"prompt_token_ids": list(self.prompt_token_ids)}
        if self.image is not None:
            image_tensors, fields["image"] = _tensor_fields(self.image)
            resume_tensors, _ = _tensor_fields(self.resume)  # its plain fields: `cross`, named below, and `start`
            tensors |= {f"image.{k}": v for k, v in image_tensors.items()}
            tensors |= {f"resume.{k}": v for k, v in resume_tensors.items()}
            tensors["resume.cross"] = self.resume.cross.tensor
            fields["ship"] = self.resume.ship
            fields["resume_start"] = self.resume.start
        return Payload(tensors, fields)

    @classmethod
    def from_payload(cls, payload: Payload) -> "DecodeRequest":
        fields = payload.fields
        if "image" not in fields:
            return cls(list(fields["prompt_token_ids"]))
        parts = {"image": {}, "resume": {}}
        for name, t in payload.tensors.items():
            owner, _, field_name = name.partition(".")
            parts[owner][field_name] = t
        cross = CROSS_KINDS[fields["ship"]](parts["resume"].pop("cross"))
        image = ImageState(**fields["image"], **parts["image"])
        resume = ResumeState(cross=cross, start=int(fields.get("resume_start", 0)), **parts["resume"])
        return cls(list(fields["prompt_token_ids"]), image, resume)

    def to(self, device) -> "DecodeRequest":
        return map_tensors(self, lambda t: t.to(device))


@dataclass(frozen=True)
class PromptLogprob:
    """A prompt token's log-probability given the tokens before it (vLLM's prompt_logprobs entry), its rank in that
    distribution and the likeliest tokens there."""

    token_id: int
    logprob: float
    rank: int  # 1: the likeliest token
    top: list[tuple[int, float]]  # (token id, logprob), likeliest first; ranks 1, 2, ...


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (usage.prompt_tokens_details)
    logprobs: list[float] = field(default_factory=list)  # the model's log-probability of each new token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # a position: (token, logprob)s
    index: int = 0  # which of the request's n completions
    error: str | None = None  # set (with finish_reason "error") when this request alone failed in the engine
    # With SamplingParams.prompt_logprobs, on completion 0's first output: entry i scores prompt token i + 1 (the
    # first token has none; None: a token the lm_head cannot produce, the image token)
    prompt_logprobs: list[PromptLogprob | None] | None = None
    # The stop token (EOS or stop_token_ids) that ended the completion: not in new_token_ids nor the text; with
    # logprobs, its logprob is the one entry of `logprobs`
    stop_token_id: int | None = None
    # On a finished output of a request with an image (elastic trimming, docs/elastic.md): its kept visual tokens at
    # the end, and the output token from which it attended to fewer (None: never shed).
    kept_tokens_end: int | None = None
    shed_at: int | None = None


@dataclass
class Generation:
    """One request's whole result from the in-process pipeline."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    visual_tokens: int
    kept_tokens: int
    cross_kv_bytes: int
    cross_kv_bytes_full: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)

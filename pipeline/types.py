"""The stages' hand-off types: what crosses from one stage to the next (prompt -> features -> trim result ->
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


@dataclass
class TrimResult:
    """Everything the decoder needs to resume the prefill right after the first cross-attention layer."""

    prompt_token_ids: list[int]
    hidden: torch.Tensor  # (S, hidden): the first cross-attention layer's output, every prompt row
    self_kv: torch.Tensor  # (first_cross, 2, KVH, S, hd): self-attention K/V of the layers before it
    cross_kv: torch.Tensor  # (cross_layers, 2, KVH, kept, hd): K/V of the kept tokens, every cross layer
    kept_image: torch.Tensor  # (kept,) which image each kept token comes from
    kept_index: torch.Tensor  # (kept,) its position among that image's tiles * patches tokens
    row_visibility: torch.Tensor  # (S, images) bool: which images each prompt row sees
    visual_tokens: list[int]  # non-padding tokens per image
    kept_tokens: list[int]  # kept tokens per image
    kept_features: torch.Tensor | None = None  # (kept, hidden): shipped instead of cross_kv in "features" mode
    kv_bytes_per_visual_token: int = 0  # K and V of one visual token across all cross-attention layers
    # The blind prefix: rows before the first image token see no image, and HF lets them attend to every visual
    # token (their mask row is all zeros), padding tiles' tokens included, which trimming never drops. The
    # decoder projects the padding tokens' K/V in each later cross-attention layer from their features (hidden
    # floats a token: 3.5x fewer bytes than the 11B's later layers' K/V); empty when no row is blind or no
    # image has padding tiles.
    prefix_len: int = 0
    tokens_per_image: int = 0  # tiles * patches: global position = image * tokens_per_image + index
    padding_features: torch.Tensor | None = None  # (P, hidden): projected features of the padding tokens
    padding_positions: torch.Tensor | None = None  # (P,) their global positions, ascending

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def kept_positions(self) -> torch.Tensor:
        """(kept,) global positions of the kept tokens, in cross_kv's order."""
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

    @property
    def nbytes(self) -> int:
        """Bytes handed to the decoder in all."""
        tensors = (self.hidden, self.self_kv, self.cross_kv, self.kept_image, self.kept_index, self.row_visibility,
                   self.kept_features, self.padding_features, self.padding_positions)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def as_features(self) -> "TrimResult":
        """The same result shipping kept features (hidden floats a token) instead of every layer's K/V."""
        assert self.kept_features is not None, "trim(..., keep_features=True) keeps them"
        return dataclasses.replace(self, cross_kv=self.cross_kv.new_zeros(0))

    def without_features(self) -> "TrimResult":
        return dataclasses.replace(self, kept_features=None)

    def without_resume_state(self) -> "TrimResult":
        """After the prefill only the small per-token metadata is read; let the big tensors go."""
        empty = self.hidden.new_zeros(0)
        return dataclasses.replace(self, hidden=empty, self_kv=empty, cross_kv=empty, kept_features=None,
                                   padding_features=empty, padding_positions=empty.long())

    def map_tensors(self, fn) -> "TrimResult":
        """A copy with `fn` applied to every tensor field (moving to a device, making contiguous)."""
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def to(self, device) -> "TrimResult":
        return self.map_tensors(lambda t: t.to(device))


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
    logprobs: list[float] = field(default_factory=list)  # the model's log-probability of each new token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # a position: (token, logprob)s
    index: int = 0  # which of the request's n completions
    error: str | None = None  # set (with finish_reason "error") when this request alone failed in the engine


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

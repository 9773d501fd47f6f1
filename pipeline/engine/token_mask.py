"""Per-row token masks for the sampler, in xgrammar's packed layout: a (B, ceil(V / 32)) int32 bitmask where bit
v % 32 of word v // 32 set means token v is allowed (xgrammar's `allocate_token_bitmask` and
`apply_token_bitmask_inplace`, llguidance's too). Structured output fills a row per constrained sequence."""

from typing import Protocol

import torch

BITS = 32


class TokenMask(Protocol):
    """What a sequence's constraint (e.g. an xgrammar GrammarMatcher behind an adapter) gives the engine."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a (B, W) int32 host bitmask (all bits set on entry)."""

    def accept(self, token: int) -> None:
        """The token sampled for this sequence; the constraint advances."""


def bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // BITS)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """(rows, W) int32, every token allowed (as xgrammar's allocate_token_bitmask)."""
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, W) int32 -> (B, vocab_size) bool, True where the token is allowed."""
    shifts = torch.arange(BITS, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1  # (B, W, 32); >> on int32 is arithmetic, & 1 keeps the bit
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits (B, V) of disallowed tokens -> -inf. Same contract as xgrammar.apply_token_bitmask_inplace
    (which the structured-output path may pass to the Sampler instead, for its CUDA/CPU kernels)."""
    logits.masked_fill_(~unpack_bitmask(bitmask.to(logits.device), logits.shape[-1]), float("-inf"))

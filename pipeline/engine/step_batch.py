"""A decode step's metadata, built once per step as tensors on the model's device and read by every layer: the
fed tokens, their positions and K/V slots, the self and cross block tables, context and cross lengths, and the
cross-attention visibility of the rows with an image (each sequence's computed once, at admission)."""

from dataclasses import dataclass

import torch

from pipeline.engine.page_table import PageTable


@dataclass
class CrossRows:
    """The batch rows that have an image (text-only rows skip cross-attention layers, as HF does)."""

    rows: torch.Tensor  # (R,) int64: their indices in the batch
    every_row: bool  # R == B: the cross layers need no row selection (known on the host)
    tables: list[PageTable]
    lengths: list[int]  # kept visual tokens of each
    max_kept: int
    block_table: torch.Tensor  # (R, max cross pages) int32, padded with page 0
    cross_lens: torch.Tensor  # (R,) int32
    mask: torch.Tensor  # (R, max_kept) bool: token visible to the row (False past its length)
    partial: list[int]  # row positions (0..R-1) whose visible tokens are not all of their kept tokens


@dataclass
class DecodeBatch:
    """One decode step for B sequences, each feeding one token."""

    tokens: torch.Tensor  # (B,) int64: the token fed
    positions: torch.Tensor  # (B,) int64: its position
    slots: torch.Tensor  # (B,) int64: the K/V slot it is written to
    context_lens: torch.Tensor  # (B,) int32: self-attention history, the fed token included
    block_table: torch.Tensor  # (B, max self pages) int32, padded with page 0
    tables: list[PageTable]
    lengths: list[int]  # context lengths on the host
    max_len: int
    cross: CrossRows | None  # None when no row has an image

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


def build_decode_batch(tokens: list[int], lengths: list[int], tables: list[PageTable],
                       cross_masks: list[torch.Tensor | None], device) -> DecodeBatch:
    """lengths[i]: sequence i's context length with the fed token; cross_masks[i]: its visibility over its kept
    tokens when not all of them (a row without an image has cross_tokens 0 and no mask)."""
    dev = torch.device(device)
    pos = [n - 1 for n in lengths]
    block = _block_table([t.self_pages for t in tables], dev)
    positions = torch.tensor(pos, device=dev)
    size = tables[0].block_size if tables else 1
    # slot = page of the position * page size + offset: one gather for the batch, no per-sequence Python
    slots = block.gather(1, (positions // size)[:, None])[:, 0].long() * size + positions % size
    with_image = [i for i, t in enumerate(tables) if t.cross_tokens]
    cross = None
    if with_image:
        ctabs = [tables[i] for i in with_image]
        kept = [t.cross_tokens for t in ctabs]
        cross_lens = torch.tensor(kept, dtype=torch.int32, device=dev)
        width = max(kept)
        mask = torch.arange(width, device=dev)[None, :] < cross_lens[:, None]
        partial = [r for r, i in enumerate(with_image) if cross_masks[i] is not None]
        for r in partial:  # several images only: a row blind to some of them
            mask[r, : kept[r]] = cross_masks[with_image[r]].to(dev)
        cross = CrossRows(torch.tensor(with_image, device=dev), len(with_image) == len(tables), ctabs, kept, width,
                          _block_table([t.cross_pages for t in ctabs], dev), cross_lens, mask, partial)
    return DecodeBatch(torch.tensor(tokens, device=dev), positions, slots,
                       torch.tensor(lengths, dtype=torch.int32, device=dev), block, tables, lengths, max(lengths),
                       cross)


def _block_table(pages: list[list[int]], dev: torch.device) -> torch.Tensor:
    """Ragged page lists -> (B, max pages) int32, padded with page 0 (never read: lengths bound every read)."""
    width = max(len(p) for p in pages)
    return torch.tensor([p + [0] * (width - len(p)) for p in pages], dtype=torch.int32, device=dev)


def decode_batch(seqs, device) -> DecodeBatch:
    """The step's batch for running sequences (one pass over them)."""
    return build_decode_batch([s.last_token for s in seqs], [s.num_tokens for s in seqs], [s.pages for s in seqs],
                              [None if s.image is None or s.cross_sees_all else s.cross_mask for s in seqs], device)

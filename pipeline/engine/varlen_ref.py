"""A CPU reference of `torch.nn.attention.varlen.varlen_attn`'s paged contract (same signature): each sequence's
K/V pages gathered by the block table, its first `seqused_k` tokens attended, non-causal. The CUDA backend runs on
it in the default suite (tests inject it), so its block tables and lengths are checked without a GPU."""

import torch
import torch.nn.functional as F


def varlen_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                     cu_seq_k: torch.Tensor | None, max_q: int, max_k: int, *, return_aux=None,
                     scale: float | None = None, window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False,
                     seqused_k: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                     num_splits: int | None = None) -> torch.Tensor:
    """query (total_q, H, hd); key, value page pools (pages, page_size, KVH, hd); block_table (B, max_pages)
    int32; seqused_k (B,) int32 -> (total_q, H, hd). max_k bounds seqused_k, as the kernel's contract says."""
    assert block_table is not None and seqused_k is not None, "the reference covers the paged contract only"
    assert return_aux is None and window_size == (-1, -1), "not part of the decode contract"
    assert int(seqused_k.max()) <= max_k and int(cu_seq_q.diff().max()) <= max_q, "max_q / max_k too small"
    pages = block_table.long()
    k = key[pages].flatten(1, 2)  # (B, max_pages * page_size, KVH, hd)
    v = value[pages].flatten(1, 2)
    valid = torch.arange(k.shape[1], device=k.device)[None, :] < seqused_k[:, None]  # (B, T)
    q_lens = cu_seq_q.diff()
    steps = torch.arange(max_q, device=query.device)
    q_valid = steps[None, :] < q_lens[:, None]  # (B, max_q)
    q_index = (cu_seq_q[:-1, None] + steps[None, :]).clamp(max=query.shape[0] - 1).long()
    q = query[q_index]  # (B, max_q, H, hd)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=enable_gqa)
    return out.transpose(1, 2)[q_valid]  # (total_q, H, hd), in cu_seq_q's order

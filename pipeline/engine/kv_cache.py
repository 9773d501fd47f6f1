"""KV memory: one preallocated arena per engine, sized by the byte budget; a sequence reserves one contiguous
region for its self-attention K/V (prompt + max_tokens) and its pruned cross-attention K/V at admission."""

from dataclasses import dataclass

import torch

ALIGN = 64  # elements; keeps every region's start aligned for vectorised kernels


@dataclass
class SeqKV:
    start: int
    size: int  # elements
    self_kv: torch.Tensor  # (self layers, 2, KVH, self_tokens, hd) view into the arena
    cross_kv: torch.Tensor  # (cross layers, 2, KVH, cross_tokens, hd) view into the arena


class KVCache:
    def __init__(self, budget_bytes: int, num_layers: int, cross_layers: list[int], kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device):
        self.capacity = budget_bytes // dtype.itemsize // ALIGN * ALIGN  # elements
        self.itemsize = dtype.itemsize
        self.arena = torch.zeros(self.capacity, dtype=dtype, device=device)
        self.num_self = num_layers - len(cross_layers)
        self.num_cross = len(cross_layers)
        self.slot = {}  # layer index -> its position among the self or the cross layers
        for kind in (False, True):
            idx = [i for i in range(num_layers) if (i in cross_layers) == kind]
            self.slot.update({layer: n for n, layer in enumerate(idx)})
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.free: list[tuple[int, int]] = [(0, self.capacity)]  # (start, size), sorted, coalesced
        self.used = 0  # elements

    @property
    def used_bytes(self) -> int:
        return self.used * self.itemsize

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * self.itemsize

    def elements(self, self_tokens: int, cross_tokens: int) -> int:
        per_token = 2 * self.kv_heads * self.head_dim
        n = per_token * (self.num_self * self_tokens + self.num_cross * cross_tokens)
        return -(-n // ALIGN) * ALIGN

    def bytes_needed(self, self_tokens: int, cross_tokens: int) -> int:
        return self.elements(self_tokens, cross_tokens) * self.itemsize

    def reserve(self, self_tokens: int, cross_tokens: int) -> SeqKV | None:
        """First fit; None when no free region is large enough (the sequence waits)."""
        size = self.elements(self_tokens, cross_tokens)
        for i, (start, free_size) in enumerate(self.free):
            if free_size >= size:
                self.free[i : i + 1] = [(start + size, free_size - size)] if free_size > size else []
                self.used += size
                return self._views(start, size, self_tokens, cross_tokens)
        return None

    def release(self, kv: SeqKV) -> None:
        self.used -= kv.size
        self.free.append((kv.start, kv.size))
        self.free.sort()
        merged = [self.free[0]]
        for start, size in self.free[1:]:
            last_start, last_size = merged[-1]
            if last_start + last_size == start:
                merged[-1] = (last_start, last_size + size)
            else:
                merged.append((start, size))
        self.free = merged

    def _views(self, start: int, size: int, self_tokens: int, cross_tokens: int) -> SeqKV:
        shape_tail = (2, self.kv_heads)
        n_self = self.num_self * 2 * self.kv_heads * self_tokens * self.head_dim
        n_cross = self.num_cross * 2 * self.kv_heads * cross_tokens * self.head_dim
        self_kv = self.arena[start : start + n_self].view(self.num_self, *shape_tail, self_tokens, self.head_dim)
        cross_kv = self.arena[start + n_self : start + n_self + n_cross].view(
            self.num_cross, *shape_tail, cross_tokens, self.head_dim
        )
        return SeqKV(start=start, size=size, self_kv=self_kv, cross_kv=cross_kv)

"""Which visual tokens to keep, from per-head attention scores: Trimmed-Llama's union of per-head top-k, the same
union sized to a target kept fraction, and ablations (a fixed token budget, an attention-mass threshold). Pure
functions on tensors."""

import math

import torch

from pipeline.config import TrimConfig

ROW_CHUNK = 128  # prompt rows scored at a time: 32 heads x 128 rows x 6,404 tokens is 105 MB in fp32


def chunk_scores(probs: torch.Tensor, token_visible: torch.Tensor) -> torch.Tensor:
    """One chunk of rows: probs (H, c, V), token_visible (c, V) -> their votes (H, V) in float32."""
    return (probs.float() * token_visible).sum(dim=1)


def head_scores(probs: torch.Tensor, token_visible: torch.Tensor) -> torch.Tensor:
    """probs (H, S, V) softmax attention; token_visible (S, V) True where row s sees token v.

    A token's score in a head is the attention it gets summed over the rows that can see it, so rows before
    an image (which HF lets attend uniformly) do not vote. Returns (H, V) in float32. Summed ROW_CHUNK rows at a
    time from the first row that sees a token, in the order the trimmer's chunked scoring adds them, so both give
    bit-identical scores.
    """
    scores = None
    first = int(token_visible.any(dim=1).long().argmax())
    for r in range(first, probs.shape[1], ROW_CHUNK):
        part = chunk_scores(probs[:, r : r + ROW_CHUNK], token_visible[r : r + ROW_CHUNK])
        scores = part if scores is None else scores + part
    return scores


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """Per head, token indices best first; ties go to the earlier token, so selection is deterministic."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def topk_count(k_ratio: float, n: int) -> int:
    # The epsilon keeps ceil(0.3 * 10) at 3 despite 0.3 * 10 == 3.0000000000000004.
    return min(n, max(1, math.ceil(k_ratio * n - 1e-9)))


def select_topk_union(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.unique(_ranked(scores)[:, :k])


def select_budget(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Exactly min(budget, V) tokens: the per-head rankings are merged rank by rank, head by head."""
    n = scores.shape[1]
    order = _ranked(scores).T.reshape(-1).tolist()  # rank 0 of every head, then rank 1, ...
    kept: dict[int, None] = {}
    for idx in order:
        kept.setdefault(idx)
        if len(kept) == min(budget, n):
            break
    return torch.tensor(sorted(kept), dtype=torch.long)


def select_target(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Exactly ceil(fraction * N) tokens, so an operator can size KV budgets in advance: the largest k whose
    per-head top-k union stays under the target (binary search; the union grows with k), then rank k of each
    head in head order until the target is met (as select_budget merges ranks)."""
    n = scores.shape[1]
    want = topk_count(fraction, n)
    ranked = _ranked(scores)
    lo, hi = 0, n  # invariant: union(lo) < want <= union(hi); union(0) is empty
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(torch.unique(ranked[:, :mid])) >= want:
            hi = mid
        else:
            lo = mid
    kept = torch.unique(ranked[:, :lo])
    taken = torch.zeros(n, dtype=torch.bool)
    taken[kept] = True
    extra = []
    for idx in ranked[:, lo].tolist():  # rank lo of every head, head by head
        if len(kept) + len(extra) == want:
            break
        if not taken[idx]:
            taken[idx] = True
            extra.append(idx)
    return torch.sort(torch.cat([kept, torch.tensor(extra, dtype=torch.long)])).values


def select_mass(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Per head, the fewest tokens holding `mass` of its attention; the union over heads."""
    ranked = _ranked(scores)
    sorted_scores = torch.gather(scores, 1, ranked)
    cum = sorted_scores.cumsum(dim=1)
    need = (cum < mass * cum[:, -1:]).sum(dim=1) + 1  # tokens needed per head
    keep = torch.arange(scores.shape[1])[None, :] < need.clamp(max=scores.shape[1])[:, None]
    return torch.unique(ranked[keep])


def importance_order(scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """kept (k,) positions -> the same positions best first, in the order select_budget merges the per-head rankings
    (a token's best rank over heads, ties to the earlier head, then the earlier token). So the first m of a
    `target`, `budget` or `topk_union` selection are exactly what `target` keeps at m tokens: dropping the tail of
    this order (shedding, pipeline/engine/kv_cache.py) leaves what a harder trim would have kept."""
    heads, n = scores.shape
    ranks = torch.empty_like(scores, dtype=torch.long)
    ranks.scatter_(1, _ranked(scores), torch.arange(n).expand(heads, n))  # ranks[h, t]: t's rank in head h
    best, head = ranks[:, kept].min(dim=0)  # min returns the first head reaching the best rank
    key = best * heads + head
    return kept[torch.sort(key, stable=True).indices]


def select_tokens(scores: torch.Tensor, cfg: TrimConfig) -> torch.Tensor:
    """scores (H, N) for one image's non-padding tokens -> sorted kept positions in [0, N)."""
    n = scores.shape[1]
    if cfg.policy == "none":
        return torch.arange(n)
    if cfg.policy == "topk_union":
        return select_topk_union(scores, topk_count(cfg.k_ratio, n))
    if cfg.policy == "target":
        return select_target(scores, cfg.target_fraction)
    if cfg.policy == "elastic":  # `target` at the fraction the pool's pressure picks
        return select_target(scores, cfg.elastic_fraction())
    if cfg.policy == "budget":
        return select_budget(scores, cfg.budget_tokens)
    if cfg.policy == "mass":
        return select_mass(scores, cfg.mass)
    if cfg.policy == "random":  # the control for ablations: same count, no attention
        gen = torch.Generator().manual_seed(cfg.seed)
        return torch.sort(torch.randperm(n, generator=gen)[: min(cfg.budget_tokens, n)]).values
    raise ValueError(f"unknown trim policy {cfg.policy!r}")

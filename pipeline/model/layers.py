"""The text decoder's two layer kinds, run from HF's own submodules and weights.

Mirrors MllamaSelfAttentionDecoderLayer and MllamaCrossAttentionDecoderLayer, split at the attention so
callers can feed K/V from wherever it lives (shipped, trimmed, or in the decoder's preallocated cache).
"""

import torch
import torch.nn.functional as F
from transformers.models.mllama.modeling_mllama import apply_rotary_pos_emb

from pipeline.model.placement import module_device


def self_qkv(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Normed input -> q (B, H, S, hd), k and v (B, KVH, S, hd) with rotary embeddings applied."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    b, s, _ = x.shape
    q = attn.q_proj(x).view(b, s, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, s, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def self_finish(layer, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """attn_out (B, H, S, hd) -> the layer's output hidden states."""
    b, _, s, _ = attn_out.shape
    h = h + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(b, s, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def cross_q(layer, h: torch.Tensor) -> torch.Tensor:
    attn = layer.cross_attn
    x = layer.input_layernorm(h)
    b, s, _ = x.shape
    return attn.q_norm(attn.q_proj(x).view(b, s, attn.num_heads, attn.head_dim).transpose(1, 2))


def cross_kv(layer, features: torch.Tensor):
    """Visual features (N, hidden) -> this layer's k, v (KVH, N, hd)."""
    attn = layer.cross_attn
    n = features.shape[0]
    k = attn.k_proj(features).view(n, attn.num_key_value_heads, attn.head_dim).transpose(0, 1)
    v = attn.v_proj(features).view(n, attn.num_key_value_heads, attn.head_dim).transpose(0, 1)
    return attn.k_norm(k), v


def project_cross_kv(text_model, cross_layers: list[int], features: torch.Tensor) -> torch.Tensor:
    """Every cross-attention layer's K/V of `features` (N, hidden) -> (layers, 2, KVH, N, hd), on the features'
    device (each layer projects on its own device)."""
    out = []
    for i in cross_layers:
        layer = text_model.layers[i]
        out.append(torch.stack(cross_kv(layer, features.to(module_device(layer)))).to(features.device))
    return torch.stack(out)


def cross_finish(layer, h: torch.Tensor, attn_out: torch.Tensor, row_sees_image: torch.Tensor) -> torch.Tensor:
    """attn_out (B, H, S, hd) -> output; rows that see no image get neither branch, as in Meta's reference (HF
    keeps their attention branch: pipeline/model/blind_rows.py). Their attn_out is never read (it may be unset)."""
    b, _, s, _ = attn_out.shape
    sees = row_sees_image[..., None]
    attn = layer.cross_attn.o_proj(attn_out.transpose(1, 2).reshape(b, s, -1))
    h = h + layer.cross_attn_attn_gate.tanh() * torch.where(sees, attn, 0.0)
    mlp = layer.mlp(layer.post_attention_layernorm(h)) * sees.to(h.dtype)
    return h + layer.cross_attn_mlp_gate.tanh() * mlp


def attend(q, k, v, scale: float, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """q (B, H, S, hd) over k, v (B, KVH, T, hd); mask is boolean (True = attend) or additive."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)


def attend_one(q, k, v, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query row: q (H, hd) over k, v (KVH, T, hd) read in place; returns (H, hd).

    Each KV head's query group becomes one small matmul (HF's pack_gqa idea): SDPA's CPU kernel is slow
    for a single row, and repeating K/V per head would copy them every step."""
    return attend_chunks(q, [(k, v)], scale, mask=mask)


def attend_chunks(q, chunks: list[tuple[torch.Tensor, torch.Tensor]], scale: float,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """attend_one over K/V held in pieces, [(k, v) (KVH, T_i, hd)] in token order, each read in place: the scores
    (KVH x groups x T, small) are joined instead of the K/V (KVH x T x hd), so fragmented pages cost no copy."""
    kvh, _, hd = chunks[0][0].shape
    qg = q.view(kvh, -1, hd)  # (KVH, groups, hd)
    # einsum picks a layout that streams K and V once; a plain (groups x T) matmul was 10x slower here.
    scores = [torch.einsum("gtd,gqd->gqt", k, qg) for k, _ in chunks]  # (KVH, groups, T_i) each
    scores = (scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(chunks[0][1].dtype)
    parts = probs.split([v.shape[1] for _, v in chunks], dim=-1)
    out = torch.einsum("gqt,gtd->gqd", parts[0], chunks[0][1])
    for p, (_, v) in zip(parts[1:], chunks[1:]):
        out = out + torch.einsum("gqt,gtd->gqd", p, v)
    return out.reshape(-1, hd)

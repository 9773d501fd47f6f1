"""Rows that see no image (the text before the first image token) get no cross-attention output, as in Meta's
reference; HF's MllamaCrossAttentionDecoderLayer adds it (an unmasked average over every visual token)."""

import torch
from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer


class BlindRowsZeroedLayer(MllamaCrossAttentionDecoderLayer):
    """HF's cross-attention decoder layer with Meta's arithmetic for rows that see no image.

    llama-models' CrossAttentionTransformerBlock multiplies both branches by `full_text_row_masked_out_mask`:
    `_attn_out = _attn_out * full_text_row_masked_out_mask` and `_ffn = full_text_row_masked_out_mask[:, 0] * _ffn`.
    transformers 5.24 multiplies only the MLP branch, so such a row attends, unmasked, to every visual token,
    padding tiles' included, and adds the result. The modules, weights and names are HF's; only that product is
    added. For a row that sees an image the mask is 1 and nothing changes."""

    def forward(self, hidden_states: torch.Tensor, cross_attention_states: torch.Tensor,
                cross_attention_mask: torch.Tensor, attention_mask: torch.Tensor,
                full_text_row_masked_out_mask: torch.Tensor | None, position_ids=None, cache=None,
                use_cache: bool | None = False, position_embeddings=None, **kwargs) -> torch.Tensor:
        residual = hidden_states
        attn, _ = self.cross_attn(hidden_states=self.input_layernorm(hidden_states),
                                  attention_mask=cross_attention_mask,
                                  cross_attention_states=cross_attention_states, cache=cache, **kwargs)
        sees = full_text_row_masked_out_mask[:, 0] if full_text_row_masked_out_mask is not None else 1.0  # (B, S, 1)
        hidden_states = residual + self.cross_attn_attn_gate.tanh() * (sees * attn)
        mlp = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + self.cross_attn_mlp_gate.tanh() * (sees * mlp)


def zero_blind_rows(model) -> None:
    """Swap the class of every cross-attention decoder layer of `model` (MllamaForConditionalGeneration) in place,
    so each of HF's entry points (forward, generate) follows Meta for rows that see no image. Idempotent."""
    for layer in model.model.language_model.layers:
        if type(layer) is MllamaCrossAttentionDecoderLayer:
            layer.__class__ = BlindRowsZeroedLayer

"""The oracle: the same trimming algorithm on the unmodified HF model, in one process, by masking.

Pass 1 runs HF's forward with hooks that capture the first cross-attention layer's softmax and selects
tokens with the same policy code. Pass 2 runs HF's own `generate` with forward pre-hooks that mask the
dropped tokens, for every row, in every later cross-attention layer and, during decoding, in the first one
too (masking a token is mathematically the same as removing it). A dropped token is a non-padding token
not selected; padding tiles' tokens are masked for every row that sees an image, and a row that sees none gets
no cross-attention output, so nobody reads them.

HF's model, with two changes where transformers 5.24 departs from Meta's reference, each by the same class swap
the pipeline makes at load (HF's modules and weights): its vision encoders tap each intermediate layer at its
input (tap_layer_inputs; HF reads its output), and rows that see no image get no cross-attention output
(zero_blind_rows; HF adds an unmasked average over every visual token). The reference stands for the model as
Meta defines it; swapping the class, rather than hooking or copying HF's forward, leaves one implementation of
each to test against an independent one (tests), and after it every HF entry point on that model agrees.
"""

from contextlib import contextmanager

import torch
from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

from pipeline.config import TrimConfig
from pipeline.model.blind_rows import zero_blind_rows
from pipeline.model.encoder import tap_layer_inputs
from pipeline.model.selection import head_scores, select_tokens
from pipeline.types import PreparedPrompt


def follow_reference(model) -> None:
    """HF's model (MllamaForConditionalGeneration) switched, in place, to Meta's reference where HF departs."""
    tap_layer_inputs(model.model.vision_model)
    zero_blind_rows(model)


def capture_cross_probs(model, inputs: dict, layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """The softmax of cross-attention `layers` (default: all) on HF's untrimmed forward, recomputed from HF's
    own q and cached k: {layer index: (H, S, V)}. Switches `model` to Meta's reference (in place)."""
    follow_reference(model)
    text = model.model.language_model
    captured, handles = {}, []
    for idx in layers if layers is not None else text.cross_attention_layers:
        def hook(module, args, kwargs, idx=idx):
            captured[idx] = (kwargs["hidden_states"], kwargs["attention_mask"])
        handles.append(text.layers[idx].cross_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        out = model(**inputs, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    probs = {}
    for idx, (hidden, mask) in captured.items():
        attn = text.layers[idx].cross_attn
        q = attn.q_norm(attn.q_proj(hidden).view(1, -1, attn.num_heads, attn.head_dim).transpose(1, 2))
        k = out.cache.layers[idx].keys.repeat_interleave(attn.num_key_value_groups, dim=1)
        probs[idx] = torch.softmax(q @ k.transpose(-1, -2) * attn.scaling + mask, dim=-1, dtype=torch.float32)[0]
    return probs


def _capture_first_cross_probs(model, inputs: dict) -> torch.Tensor:
    """Softmax of the first cross-attention layer (H, S, V)."""
    first = model.model.language_model.cross_attention_layers[0]
    return capture_cross_probs(model, inputs, [first])[first]


@torch.inference_mode()
def reference_select(model, prompt: PreparedPrompt, cfg: TrimConfig) -> torch.Tensor:
    """Kept token mask (images * tiles * patches,) bool, over HF's own visual token layout."""
    probs = _capture_first_cross_probs(model, prompt.hf_inputs())
    _, images, tiles = prompt.cross_attention_mask.shape
    per_image = probs.shape[-1] // images
    scores = head_scores(probs, prompt.token_visible(per_image // tiles))
    valid = prompt.token_valid(per_image // tiles)
    keep = torch.zeros(images * per_image, dtype=torch.bool)
    for i in range(images):
        idx = valid[i].nonzero().squeeze(1)
        keep[i * per_image + idx[select_tokens(scores[:, i * per_image + idx], cfg)]] = True
    return keep


@contextmanager
def _dropped_masked(model, prompt: PreparedPrompt, cfg: TrimConfig, shed: tuple[int, torch.Tensor] | None = None):
    """While the context lasts, the tokens `cfg` drops are masked in every cross-attention layer after the first,
    and in the first one too once decoding. Nothing is masked for a prompt without images or with trimming off.
    shed = (t, still): elastic shedding's reference (docs/elastic.md): from output token t on (the forward that
    computes it), every visual token outside `still` (global positions) is masked too."""
    handles = []
    if prompt.num_images and cfg.enabled:
        keep = reference_select(model, prompt, cfg)
        tiles = prompt.cross_attention_mask.shape[-1]
        dropped = ~keep & prompt.token_valid(len(keep) // prompt.num_images // tiles).reshape(-1)
        after_shed = dropped.clone()
        if shed is not None:
            after_shed[~torch.isin(torch.arange(len(keep)), shed[1])] = True
        text = model.model.language_model
        first = text.cross_attention_layers[0]
        forwards = [-1]  # forward calls of the language model so far, less one: call t computes output token t

        def count(module, args, kwargs):
            forwards[0] += 1

        def mask_dropped(module, args, kwargs):
            mask = kwargs["cross_attention_mask"]
            if module.layer_idx == first and mask.shape[2] > 1:
                return None  # the first layer's prefill sees every token: that is where scores come from
            masked = after_shed if shed is not None and forwards[0] >= shed[0] else dropped
            mask = mask.masked_fill(masked[None, None, None, :], torch.finfo(mask.dtype).min)
            kwargs["cross_attention_mask"] = mask
            return args, kwargs

        handles.append(text.register_forward_pre_hook(count, with_kwargs=True))
        for layer in text.layers:
            if isinstance(layer, MllamaCrossAttentionDecoderLayer):
                handles.append(layer.register_forward_pre_hook(mask_dropped, with_kwargs=True))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def reference_generate(model, prompt: PreparedPrompt, cfg: TrimConfig, max_new_tokens: int,
                       shed: tuple[int, torch.Tensor] | None = None) -> list[int]:
    """Greedy token ids (EOS included, no padding) of HF generate with the dropped tokens masked (and, with `shed`,
    the shed ones from its step on: _dropped_masked). Switches `model` to Meta's reference (in place)."""
    follow_reference(model)
    with _dropped_masked(model, prompt, cfg, shed):
        out = model.generate(**prompt.hf_inputs(), max_new_tokens=max_new_tokens, do_sample=False)
    return trim_generated(out[0, prompt.input_ids.numel() :].tolist(), model)


@torch.inference_mode()
def reference_logits(model, prompt: PreparedPrompt, cfg: TrimConfig) -> torch.Tensor:
    """(S, V) fp32 logits of every prompt row of HF's forward with the dropped tokens masked: row p is the
    distribution of token p + 1 (what prompt_logprobs scores). Switches `model` to Meta's reference (in place)."""
    follow_reference(model)
    with _dropped_masked(model, prompt, cfg):
        return model(**prompt.hf_inputs()).logits[0].float()


def trim_generated(ids: list[int], model) -> list[int]:
    """HF pads finished sequences; cut after the first EOS."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids

"""The stage chain, written once: a prepared prompt -> encode -> trim -> a decode request, a text-only prompt
skipping both stages. The stage calls are passed in, so one chain serves in-process stage objects, the ingress's
Serve handles (whose calls return responses it passes on unawaited) and the batch job's actors."""

from collections.abc import Callable

from pipeline.types import DecodeRequest, PreparedPrompt


def trimmer_input(prepared: PreparedPrompt) -> PreparedPrompt:
    """What the trimmer reads of a prompt: its ids and cross-attention mask, not the pixels."""
    return PreparedPrompt(input_ids=prepared.input_ids, cross_attention_mask=prepared.cross_attention_mask)


def text_request(prepared: PreparedPrompt) -> DecodeRequest:
    """A text-only prompt's decode request: the decoder prefills it from the first layer."""
    return DecodeRequest(prepared.input_ids.tolist())


def run_stages(prepared: PreparedPrompt, encode: Callable, trim: Callable, text: Callable = lambda r: r):
    """encode(prepared) -> visual, then trim(trimmer_input(prepared), visual): the trimmer's result (a decode
    request, or whatever the caller's `trim` returns for it). A text-only prompt: text(its decode request)."""
    if prepared.num_images == 0:
        return text(text_request(prepared))
    return trim(trimmer_input(prepared), encode(prepared))

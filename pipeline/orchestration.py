"""The stage chain, written once: a prepared prompt -> encode -> trim -> a decode request, a text-only prompt
skipping both stages. The stage calls are passed in, so one chain serves in-process stage objects, the ingress's
Serve handles (whose calls return responses it passes on unawaited) and the batch job's actors."""

from collections.abc import Callable

from pipeline.types import DecodeRequest, PreparedPrompt


def trimmer_input(prepared: PreparedPrompt) -> PreparedPrompt:
    """What the trimmer reads of a prompt: its ids, cross-attention mask and cache salt, not the pixels."""
    return PreparedPrompt(input_ids=prepared.input_ids, cross_attention_mask=prepared.cross_attention_mask,
                          cache_salt=prepared.cache_salt)


def text_request(prepared: PreparedPrompt) -> DecodeRequest:
    """A text-only prompt's decode request: the decoder prefills it from the first layer."""
    return DecodeRequest(prepared.input_ids.tolist())


def run_stages(prepared: PreparedPrompt, encode: Callable, trim: Callable, text: Callable = lambda r: r):
    """encode(prepared) -> visual, then trim(trimmer_input(prepared), visual): the trimmer's result (a decode
    request, or whatever the caller's `trim` returns for it). A text-only prompt: text(its decode request)."""
    if prepared.num_images == 0:
        return text(text_request(prepared))
    return trim(trimmer_input(prepared), encode(prepared))


def each_or_error(batch_fn: Callable, items: list) -> list:
    """batch_fn(items) -> one result per item; if the batch raises, each item runs alone, so a bad item fails alone:
    its exception in its place, the others' results in theirs."""
    if not items:
        return []
    try:
        return list(batch_fn(items))
    except Exception as exc:
        if len(items) == 1:
            return [exc]
        return [each_or_error(batch_fn, [item])[0] for item in items]


def run_stages_batched(prepared: list[PreparedPrompt], encode_batch: Callable, trim_batch: Callable,
                       text: Callable = lambda r: r) -> list:
    """run_stages over many prompts, each stage called once for all the prompts with images (encode_batch(list of
    prompts) -> visuals, trim_batch(trimmer inputs, visuals) -> results); text-only prompts skip both. Returns per
    prompt its result or the exception that stopped it (each_or_error)."""
    out: list = [None] * len(prepared)
    with_images = []
    for i, p in enumerate(prepared):
        if p.num_images == 0:
            out[i] = text(text_request(p))
        else:
            with_images.append(i)
    visuals = each_or_error(encode_batch, [prepared[i] for i in with_images])
    encoded = []
    for i, visual in zip(with_images, visuals):
        if isinstance(visual, Exception):
            out[i] = visual
        else:
            encoded.append((i, visual))
    trimmed = each_or_error(lambda pairs: trim_batch([trimmer_input(prepared[i]) for i, _ in pairs],
                                                     [v for _, v in pairs]), encoded)
    for (i, _), result in zip(encoded, trimmed):
        out[i] = result
    return out

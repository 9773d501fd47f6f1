"""Batched encode and trim equal batch 1: the same features (bitwise), the same kept tokens, the same resume state
and the decoder's same greedy tokens, over 1-, 2- and 4-tile images, two-image prompts, text before the image and
prompts of different lengths; the in-process pipeline and the batch job's stages batch, a bad prompt failing alone."""

import pytest
import torch

from pipeline.config import TrimConfig
from pipeline.engine.sampling import SamplingParams
from pipeline.model.inputs import user_message
from pipeline.orchestration import trimmer_input
from pipeline.quality.synthetic import noise_image
from tests.helpers import PROMPTS

# (prompt, images, text before the images): the template puts images first unless the message says otherwise
SPECS = [
    (PROMPTS[0], ["1tile"], False),
    (PROMPTS[1], ["4tile"], False),
    (PROMPTS[2] + " and then tell me everything about it in great detail", ["2tile"], False),
    (PROMPTS[3], ["1tile", "4tile"], False),
    (PROMPTS[1], ["2tile", "2tile"], False),
    (PROMPTS[2], ["4tile"], True),
    ("hi", ["2tile"], False),
    (PROMPTS[0] + " " + PROMPTS[3], ["4tile", "1tile"], True),
]


def _prepare(pipe, imgs, prompt: str, names: list[str], text_first: bool):
    if not text_first:
        return pipe.prepare(prompt, [imgs[n] for n in names])
    from pipeline.model.inputs import prepare_prompt

    message = user_message(prompt, len(names))
    message[0]["content"] = message[0]["content"][-1:] + message[0]["content"][:-1]  # the text, then the images
    cfg = pipe.loaded.cfg
    return prepare_prompt(pipe.loaded.processor, message, [imgs[n] for n in names], cfg.max_images,
                          cfg.max_prompt_tokens)


@pytest.fixture(scope="module")
def prepared(tiny_pipeline, imgs):
    out = [_prepare(tiny_pipeline, imgs, *spec) for spec in SPECS]
    blind = [int((p.cross_attention_mask.sum(dim=(1, 2)) == 0).sum()) for p in out]  # rows that see no image
    assert blind[5] > blind[0] + 3, "the text-first prompt's text comes before its image"
    return out


def _assert_same_request(a, b):
    """Same kept tokens, bitwise the same image and resume state."""
    assert a.prompt_token_ids == b.prompt_token_ids
    ta, tb = a.to_payload(), b.to_payload()
    assert ta.fields == tb.fields
    assert ta.tensors.keys() == tb.tensors.keys()
    for name in ta.tensors:
        assert torch.equal(ta.tensors[name], tb.tensors[name]), name


@pytest.mark.parametrize("images_per_forward", [1, 3, 64])
def test_encode_batch_equals_one_at_a_time(tiny_pipeline, prepared, images_per_forward):
    from pipeline.model.encoder import VisionEncoder

    alone = [tiny_pipeline.encoder.encode(p) for p in prepared]
    encoder = VisionEncoder(tiny_pipeline.loaded, images_per_forward)
    forwards = []
    vision = encoder.vision
    encoder.vision = lambda **inputs: forwards.append(inputs["pixel_values"].shape[1]) or vision(**inputs)
    encoder.encode_batch(prepared)
    images, most = sum(p.num_images for p in prepared), max(p.num_images for p in prepared)
    # Stacked up to the bound; a prompt's images never split over forwards.
    assert sum(forwards) == images and max(forwards) == max(min(images_per_forward, images), most)
    for order in (range(len(prepared)), range(len(prepared))[::-1], range(2, 5)):
        together = encoder.encode_batch([prepared[i] for i in order])
        for i, visual in zip(order, together):
            want = alone[i]
            assert torch.equal(visual.features, want.features) and torch.equal(visual.token_valid, want.token_valid)
            assert visual.features.untyped_storage().nbytes() == visual.nbytes  # its own, not the batch's


@pytest.mark.parametrize("cfg", [TrimConfig(), TrimConfig(k_ratio=0.05), TrimConfig(policy="target"),
                                 TrimConfig(policy="budget", budget_tokens=2), TrimConfig(policy="mass"),
                                 TrimConfig(trim_first_layer=True), TrimConfig(policy="none")],
                         ids=["k0.15", "k0.05", "target", "budget2", "mass", "trim-first", "none"])
@pytest.mark.parametrize("ship", ["kv", "features"])
def test_trim_batch_equals_one_at_a_time(tiny_pipeline, prepared, cfg, ship):
    trimmer = tiny_pipeline.trimmer
    visuals = [tiny_pipeline.encoder.encode(p) for p in prepared]
    alone = [trimmer.trim(trimmer_input(p), v, cfg, ship=ship) for p, v in zip(prepared, visuals)]
    together = trimmer.trim_batch([trimmer_input(p) for p in prepared], visuals, [cfg] * len(prepared), ship=ship)
    for a, b in zip(alone, together):
        _assert_same_request(a, b)
        assert b.resume.hidden.untyped_storage().nbytes() == b.resume.hidden.nbytes  # not a view of the batch's
    if cfg.enabled:
        assert sum(r.num_kept for r in together) < sum(sum(r.image.visual_tokens) for r in together)


def test_trim_batch_mixed_configs_and_many_images(tiny_pipeline):
    """Many noise images (so near-ties in the scores are likely somewhere) with each prompt's own config: the kept
    sets are exactly those of batch 1, and the decoder's greedy tokens are the same."""
    pipe = tiny_pipeline
    sizes = [(64, 64), (100, 40), (40, 100), (128, 128), (128, 64), (64, 128), (90, 90), (30, 30)]
    prepared = [pipe.prepare(PROMPTS[i % 4] + " x" * (i % 5), [noise_image(w, h, 100 + i)])
                for i, (w, h) in enumerate(sizes * 2)]
    cfgs = [TrimConfig(k_ratio=r) for r in (0.02, 0.1, 0.3, 0.6)] * 4
    visuals = pipe.encoder.encode_batch(prepared)
    alone = [pipe.trimmer.trim(trimmer_input(p), v, c) for p, v, c in zip(prepared, visuals, cfgs)]
    together = pipe.trimmer.trim_batch([trimmer_input(p) for p in prepared], visuals, cfgs)
    for a, b in zip(alone, together):
        _assert_same_request(a, b)
    params = SamplingParams(max_tokens=8)
    assert [s.output_ids for s in pipe.engine.generate(alone, params)] == \
        [s.output_ids for s in pipe.engine.generate(together, params)]


def test_pipeline_trim_many_equals_trim_and_fails_a_bad_prompt_alone(tiny_pipeline, prepared, imgs):
    pipe = tiny_pipeline
    text_only = pipe.prepare(PROMPTS[0], [])
    bad = pipe.prepare(PROMPTS[1], [imgs["1tile"]])
    bad.aspect_ratio_ids = torch.full_like(bad.aspect_ratio_ids, 99)  # no such aspect ratio: the tower fails
    batch = prepared[:4] + [bad, text_only] + prepared[4:]
    calls = []
    encode_batch = pipe.encoder.encode_batch
    pipe.encoder.encode_batch = lambda ps: calls.append(len(ps)) or encode_batch(ps)
    try:
        out = pipe.trim_many(batch, TrimConfig(k_ratio=0.1))
    finally:
        del pipe.encoder.encode_batch
    assert calls[0] == len(prepared) + 1  # one tower call for every prompt with images; then each alone
    assert isinstance(out[4], IndexError)
    assert out[5].prompt_token_ids == text_only.input_ids.tolist() and out[5].image is None
    for p, request in zip(prepared, out[:4] + out[6:]):
        _assert_same_request(pipe.trim(p, TrimConfig(k_ratio=0.1)), request)


def test_batch_job_stages_batch_their_rows(tiny_pipeline, monkeypatch):
    """EncodeStage runs one tower call for its rows and TrimStage one trim_batch; their states equal the
    in-process trim of each row; a row that breaks the trimmer's batch fails alone."""
    import pyarrow as pa

    from pipeline.batch.config import BatchConfig
    from pipeline.batch.stages import EncodeStage, TrimStage, pack, unpack, unpack_request
    from pipeline.storage import S3Settings
    from tests.helpers import png

    cfg = BatchConfig()
    images = [noise_image(w, h, 7 + i) for i, (w, h) in enumerate([(64, 64), (128, 128), (100, 40), (64, 64)])]
    rows = [{"id": f"r{i}", "prompt": PROMPTS[i], "image": png(im), "image_uri": None} for i, im in enumerate(images)]
    rows.append({"id": "text", "prompt": "hello", "image": None, "image_uri": None})
    rows.append({"id": "junk", "prompt": "what?", "image": b"not an image", "image_uri": None})
    encode, trim = EncodeStage(cfg, S3Settings()), TrimStage(cfg)
    calls = {"encode": [], "trim": []}
    encode_batch, trim_batch = encode.encoder.encode_batch, trim.trimmer.trim_batch
    monkeypatch.setattr(encode.encoder, "encode_batch", lambda ps: calls["encode"].append(len(ps)) or encode_batch(ps))
    monkeypatch.setattr(trim.trimmer, "trim_batch",
                        lambda ps, vs, *a, **k: calls["trim"].append(len(ps)) or trim_batch(ps, vs, *a, **k))
    encoded = encode(pa.Table.from_pylist(rows))
    assert calls["encode"] == [4]
    states = encoded.column("state").to_pylist()
    broken = unpack(states[2])  # a row whose features do not match its mask breaks the batch it is in
    broken["trim_input"]["features"] = broken["trim_input"]["features"][:, :5]
    states[2] = pack(broken)
    encoded = encoded.set_column(2, "state", pa.array(states, pa.binary()))
    out = trim(encoded).to_pylist()
    assert calls["trim"] == [4, 1, 1, 1, 1]  # the batch, then each alone
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert "could not be decoded" in out[5]["error"] and out[2]["error"].startswith("trimmer failed")
    for i in (0, 1, 3):
        assert out[i]["error"] is None
        want = tiny_pipeline.trim(tiny_pipeline.prepare(PROMPTS[i], [images[i]]), cfg.trim)
        _assert_same_request(unpack_request(unpack(out[i]["state"])), want.to("cpu"))
    assert out[4]["error"] is None and unpack_request(unpack(out[4]["state"])).image is None

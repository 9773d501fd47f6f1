"""The VisionEncoder and Trimmer deployments batch concurrent calls (`@serve.batch`, size and wait from their
user_config, changed in place): a batch of more than one forms, each call gets what it gets alone, the feature cache
still serves repeated images, a bad call in a batch fails alone, and /stats shows the batches that formed."""

import json

import httpx
import pytest
import torch

from tests.helpers import PROMPTS, wait_for

APP = "crosstrim"
BATCHING = {"max_batch_size": 8, "batch_wait_timeout_s": 0.5}  # long enough that the calls below meet


@pytest.fixture(scope="module")
def pipe():
    """The in-process stages on configs/local.yaml's model (the answers each call must equal)."""
    import yaml

    from pipeline.config import ModelConfig
    from pipeline.inprocess import Pipeline
    from tests.helpers import ROOT

    args = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())["applications"][0]["args"]
    return Pipeline(ModelConfig(**args["model"]))


@pytest.mark.serve_in_place
def test_stage_deployments_batch_and_fail_alone(serve_app, pipe):
    from ray import serve

    from pipeline.config import TrimConfig
    from pipeline.orchestration import trimmer_input
    from pipeline.quality.synthetic import noise_image

    args = serve_app.config["applications"][0]["args"]
    config = serve_app.session.config(deployments={
        "VisionEncoder": {"user_config": {"feature_cache_mib": args["feature_cache_mib"], "batching": BATCHING}},
        "Trimmer": {"user_config": {"ship": args["ship"], "batching": BATCHING}}})
    serve_app.session.deploy_in_place(config)
    encoder = serve.get_deployment_handle("VisionEncoder", app_name=APP)
    trimmer = serve.get_deployment_handle("Trimmer", app_name=APP)
    for handle in (encoder, trimmer):  # reconfigure ran on the live replica
        wait_for(lambda h=handle: h.batch_stats.remote().result()["batch_wait_timeout_s"] == 0.5, 300,
                 "the new batching in place")

    sizes = [(64, 64), (100, 40), (128, 128), (40, 100), (90, 90)]
    prepared = [pipe.prepare(PROMPTS[i % 4], [noise_image(w, h, 50 + i)]) for i, (w, h) in enumerate(sizes)]
    prepared.append(pipe.prepare(PROMPTS[0], [noise_image(64, 64, 50), noise_image(128, 128, 52)]))  # two images
    keys = [[f"b{i}"] for i in range(len(sizes))] + [["b0", "b2"]]
    bad = pipe.prepare(PROMPTS[1], [noise_image(64, 64, 99)])
    bad.aspect_ratio_ids = torch.full_like(bad.aspect_ratio_ids, 99)  # no such aspect ratio: the tower fails
    before = encoder.batch_stats.remote().result()
    cache_before = encoder.cache_stats.remote().result()
    calls = [encoder.encode.remote(p, k) for p, k in zip(prepared, keys)] + [encoder.encode.remote(bad, ["bad"])]
    *visuals, bad_call = calls
    visuals = [c.result() for c in visuals]
    with pytest.raises(IndexError, match="index"):
        bad_call.result()
    after = encoder.batch_stats.remote().result()
    assert after["largest"] > 1 and after["calls"] - before["calls"] == len(calls)
    cache = encoder.cache_stats.remote().result()
    assert cache["misses"] - cache_before["misses"] == len(sizes) + 1  # b0 and b2 came from the batch, once each
    for p, visual in zip(prepared, visuals):
        want = pipe.encoder.encode(p)
        assert torch.equal(visual.features, want.features) and torch.equal(visual.token_valid, want.token_valid)

    cfgs = [TrimConfig(k_ratio=r) for r in (0.05, 0.15, 0.3, 0.15, 0.6, 0.15)]
    broken = visuals[1].__class__(visuals[1].features[:, :7], visuals[1].token_valid)  # breaks the batch it is in
    before = trimmer.batch_stats.remote().result()
    calls = [trimmer.trim.remote(trimmer_input(p), v, c) for p, v, c in zip(prepared, visuals, cfgs)]
    bad_call = trimmer.trim.remote(trimmer_input(prepared[1]), broken, cfgs[1])
    handoffs = [c.result() for c in calls]
    with pytest.raises(ValueError, match="do not match token_valid"):
        bad_call.result()
    after = trimmer.batch_stats.remote().result()
    assert after["largest"] > 1 and after["calls"] - before["calls"] == len(calls) + 1
    # Each call again alone (a batch of one each): bitwise the same. Against this process's trimmer (other torch
    # threads, so GEMMs may round differently): the same kept tokens, the resume state within 1e-5 (relative).
    for p, v, c, handoff in zip(prepared, visuals, cfgs, handoffs):
        got = handoff.request().to_payload()
        alone = trimmer.trim.remote(trimmer_input(p), v, c).result().request().to_payload()
        assert got.fields == alone.fields
        assert all(torch.equal(got.tensors[k], alone.tensors[k]) for k in alone.tensors)
        local = pipe.trimmer.trim(trimmer_input(p), v, c, ship=args["ship"]).to_payload()
        assert got.fields == local.fields
        for k, t in local.tensors.items():
            if k.startswith("image."):
                assert torch.equal(got.tensors[k], t), k
            else:
                torch.testing.assert_close(got.tensors[k], t, rtol=1e-5, atol=1e-5)
    assert trimmer.batch_stats.remote().result()["sizes"][1] >= len(handoffs)
    # /stats shows every replica's batches (one replica each here), as each stage counts them
    shown = httpx.get(f"{serve_app.url}/stats", timeout=30).json()["stage_batches"]
    for stage, handle in (("encoder", encoder), ("trimmer", trimmer)):
        (replica,) = shown[stage]
        direct = handle.batch_stats.remote().result()
        assert replica == json.loads(json.dumps(direct)) and replica["largest"] > 1, stage  # JSON: str size keys

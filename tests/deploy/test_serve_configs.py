"""The Serve configs in configs/ validated without a cluster: Serve's schema, our AppConfig, the stages' resources,
the decoder's router and autoscaling."""

import pytest
import yaml

from tests.helpers import ROOT

CONFIGS = ROOT / "configs"
DEPLOYMENTS = {"Ingress", "VisionEncoder", "Trimmer", "DecoderPool"}


@pytest.mark.parametrize("name", ["local.yaml", "local-2node.yaml", "llama-3.2-11b-vision.yaml",
                                  "llama-3.2-90b-vision.yaml"])
def test_config_validates(name):
    from ray.serve.schema import ServeDeploySchema

    from deployments.config import AppConfig

    config = ServeDeploySchema.model_validate(yaml.safe_load((CONFIGS / name).read_text()))
    (app,) = config.applications
    assert app.import_path == "deployments.app:build_app"
    cfg = AppConfig(**app.args)
    assert {d.name for d in app.deployments} == DEPLOYMENTS
    assert app.runtime_env["env_vars"]["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] == "1"
    opts = {d.name: d for d in app.deployments}
    as_dict = lambda x: x if isinstance(x, dict) else x.model_dump()  # noqa: E731
    if name == "local.yaml":
        assert cfg.model.source == "bundled:tiny-mllama-vqa"  # the trained demo model
        assert sum(d.ray_actor_options.num_cpus * d.num_replicas for d in app.deployments) <= 2
        assert all(d.ray_actor_options.num_cpus < 1 for d in app.deployments)
    elif name == "local-2node.yaml":  # local.yaml's app, each stage pinned to its node by a custom resource
        local = AppConfig(**yaml.safe_load((CONFIGS / "local.yaml").read_text())["applications"][0]["args"])
        # Only how long a request waits for a missing stage differs: a node may be gone for good here, so a request
        # for its stages is answered (503) well within 10 s, where one node waits out a restart.
        assert cfg.stage_wait_s < 10 <= local.stage_wait_s
        assert cfg.model_copy(update={"stage_wait_s": local.stage_wait_s}) == local
        for d in app.deployments:
            want = "crosstrim_decoder" if d.name == "DecoderPool" else "crosstrim_frontend"
            assert d.ray_actor_options.resources == {want: 1}, d.name
            assert d.ray_actor_options.num_cpus < 1
    else:
        assert cfg.model.dtype == "bfloat16" and cfg.model.source.startswith(("s3://", "/"))
        # A share of a GPU is enough for the tower and for the trimmer (embeddings, layers through the first cross
        # layer, later cross layers' K/V projections); tests/deploy/test_gpu_fit.py checks each stage's weights fit.
        for stage in ("VisionEncoder", "Trimmer", "DecoderPool"):
            assert opts[stage].ray_actor_options.num_gpus >= (1 if stage == "DecoderPool" else 0.1)
            scaling = as_dict(opts[stage].autoscaling_config)
            assert scaling["max_replicas"] >= scaling["min_replicas"] >= 1
    router = as_dict(opts["DecoderPool"].request_router_config)
    assert router["request_router_class"] == "deployments.router:KVBudgetRouter"
    assert opts["DecoderPool"].max_ongoing_requests > cfg.engine.max_running + cfg.engine.max_waiting


@pytest.mark.parametrize("name", ["local-2node.yaml", "llama-3.2-11b-vision.yaml", "llama-3.2-90b-vision.yaml"])
def test_decoder_autoscaling_target_follows_max_running(name):
    """A second decoder replica is asked for at 3/4 of the engine's max_running ongoing requests, before one
    replica's batch is full (and Serve's queue, max_ongoing_requests, sits above running + waiting)."""
    app = yaml.safe_load((CONFIGS / name).read_text())["applications"][0]
    engine = app["args"]["engine"]
    pool = next(d for d in app["deployments"] if d["name"] == "DecoderPool")
    assert pool["autoscaling_config"]["target_ongoing_requests"] == engine["max_running"] * 3 // 4
    assert pool["max_ongoing_requests"] > engine["max_running"] + engine["max_waiting"]

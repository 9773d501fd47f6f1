"""One local Ray and one Serve app for every test under tests/serve: configs/local.yaml (with a moto S3 and an
image host on loopback in its allowlists), redeployed only for a test that asks for other settings with
`@pytest.mark.serve_config(args={...}, env={...}, deployments={"Name": {...}})` (or a module's `pytestmark`)."""

import copy
import http.server as http_server
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from deployments.localrun import free_port
from tests.helpers import ROOT, image, png, wait_for

APP = "crosstrim"
BUCKET = "crosstrim-test-images"
# The one alternative config the default run deploys (each distinct serve_config is a redeploy, minutes on 2 busy
# cores): the trimmer ships features (test_serve's ship test) and prompts may run to 2,048 tokens (test_tools' two
# tools' prompt). Tests that need neither setting's absence share it rather than deploy a config of their own.
FEATURES_LONG_PROMPTS = {"args": {"ship": "features", "model": {"max_prompt_tokens": 2048}}}


def merged(base: dict, changes: dict) -> dict:
    """base with changes merged in, dicts key by key (a deep update that leaves base alone)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class ServeSession:
    """The running Ray and the Serve config deployed on it; `app(...)` deploys a config only when it differs."""

    def __init__(self, base: dict, metrics_port: int):
        self.base, self.metrics_port, self.deployed = base, metrics_port, None

    def config(self, args: dict | None = None, env: dict | None = None, deployments: dict | None = None) -> dict:
        config = copy.deepcopy(self.base)
        (app,) = config["applications"]
        app["args"] = merged(app["args"], args or {})
        app["runtime_env"]["env_vars"].update(env or {})
        for d in app["deployments"]:
            d.update(merged(d, (deployments or {}).get(d["name"], {})))
        return config

    def app(self, **overrides) -> SimpleNamespace:
        import ray
        from ray import serve
        from ray.serve.context import _get_global_client

        from deployments import localrun

        config = self.config(**overrides)
        if config != self.deployed:
            if self.deployed is not None:
                serve.delete(APP)  # blocks until its replicas are gone: no replica of the old config is left
            self.deployed = None
            try:
                localrun.deploy(config, APP, timeout_s=600)
            except ray.exceptions.RayActorError:  # Serve killed a proxy slow to report ready (a loaded machine)
                localrun.deploy(config, APP, timeout_s=600)
            self.deployed = config
        port = config["http_options"]["port"]
        return SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, config=copy.deepcopy(config),
                               metrics_url=f"http://127.0.0.1:{self.metrics_port}/metrics",
                               client=_get_global_client(), session=self)

    def deploy_in_place(self, config: dict) -> None:
        """Apply `config` to the running app as `serve deploy` would (a test of in-place changes); a later test that
        wants another config gets a fresh deployment."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
        self.deployed = copy.deepcopy(config)


@pytest.fixture(scope="package")
def images() -> dict[str, bytes]:
    # Distinct images per test so the encoder's feature cache is exercised only where meant.
    return {name: png(image(w, h, seed)) for name, (w, h, seed) in {
        "exact": (100, 40, 11), "exact2": (64, 64, 12), "openai": (128, 128, 13), "cache": (64, 64, 14),
        "s3": (64, 64, 15), "http": (64, 64, 16), "batch": (100, 40, 17),
    }.items()}


def reserved_port() -> socket.socket:
    """A loopback port held for the Serve proxy until the session ends: bound with SO_REUSEPORT (as Ray's proxy binds
    it) and never listening, so the proxy can bind it beside us but no other process's free-port pick can take it in
    the minutes Ray takes to start on a busy machine (seen: another test's moto_server on it, the proxy failing to
    bind)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _reachable(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="package")
def s3_endpoint(images):
    """A real moto S3 server holding one image."""
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _reachable(url), 60, "moto_server")
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="img/shape.png", Body=images["s3"])
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="package")
def image_host(images):
    """A real HTTP server serving /allowed/img.png and /other/img.png."""
    class Handler(http_server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = images["http"]
            self.send_response(200 if self.path.endswith("/img.png") else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="package")
def serve_session(s3_endpoint, image_host):
    """configs/local.yaml on a fresh local Ray, as `serve run` does it, on a free port; the tests only add their S3
    endpoint and image host to the allowlists. Package-scoped: Ray stops after the last test here, before other
    folders' tests start their own."""
    from deployments import localrun

    port = reserved_port()
    base = localrun.load_config(ROOT / "configs" / "local.yaml", port=port.getsockname()[1])
    (app,) = base["applications"]
    app["runtime_env"]["env_vars"].update(
        AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    app["args"]["s3_buckets"] = [BUCKET]
    app["args"]["http_allowlist"] = [f"{image_host}/allowed/"]
    metrics_port = free_port()
    localrun.start_ray(num_cpus=2, metrics_port=metrics_port)
    try:
        yield ServeSession(base, metrics_port)
    finally:
        localrun.stop()
        port.close()


@pytest.fixture()
def serve_app(request, serve_session):
    """The app deployed with configs/local.yaml, or with the overrides of the test's `serve_config` mark."""
    mark = request.node.get_closest_marker("serve_config")
    return serve_session.app(**(mark.kwargs if mark else {}))


def _config_key(item) -> str:
    mark = item.get_closest_marker("serve_config")
    return repr(mark.kwargs) if mark else ""


def pytest_collection_modifyitems(session, config, items):
    """tests/serve's tests grouped by the config they deploy, configs/local.yaml's first and a test that changes the
    app in place (`serve_in_place`) last in its group: the one app is redeployed once per config (minutes each on 2
    busy cores), not at every switch between modules. Other folders' tests keep their places."""
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if here in Path(item.path).parents]
    ours = [items[i] for i in slots]
    rank: dict[str, int] = {"": -1}
    for item in ours:
        rank.setdefault(_config_key(item), len(rank))
    ours.sort(key=lambda item: (rank[_config_key(item)], item.get_closest_marker("serve_in_place") is not None))
    for i, item in zip(slots, ours):
        items[i] = item

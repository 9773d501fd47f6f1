"""Deploy a Serve config file on a fresh local Ray, the way `serve run CONFIG` does, for tests and measurements."""

import os
import socket
import time
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_config(path: str | Path, port: int | None = None) -> dict:
    """The YAML as a dict, its HTTP port replaced (other Serve instances may hold 8000)."""
    config = yaml.safe_load(Path(path).read_text())
    config.setdefault("http_options", {})["port"] = port or free_port()
    return config


def start_ray(num_cpus: int = 2, metrics_port: int | None = None) -> None:
    import ray

    os.environ["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = "1"  # the driver too, for tensors it puts
    # address="local": never attach to a cluster someone else (or a killed run) left behind.
    ray.init(address="local", num_cpus=num_cpus, namespace="serve", include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})


def deploy(config: dict, app: str = "crosstrim", timeout_s: float = 300) -> str:
    """serve.start with the config's HTTP options, deploy its applications, wait until `app` runs; the base URL."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    http = {"host": schema.http_options.host, "port": schema.http_options.port}
    # The config's proxy placement: proxies on several nodes of one machine would share the port (SO_REUSEPORT).
    serve.start(proxy_location=schema.proxy_location, http_options=http)
    _get_global_client().deploy_apps(schema)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return f"http://{http['host']}:{http['port']}"
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"{app} failed to deploy: {status.message}")
        time.sleep(0.5)
    raise TimeoutError(f"{app} not running after {timeout_s}s")


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()

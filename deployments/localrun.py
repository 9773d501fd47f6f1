"""Deploy a Serve config file on a fresh local Ray, the way `serve run CONFIG` does, for tests and measurements."""

import contextlib
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


def init_local_ray(attempts: int = 3, **options) -> None:
    """`ray.init(address="local", **options)`: a fresh local Ray, never a cluster someone else (or a killed run) left
    behind. Ray waits a fixed 30 s for its raylet to register with the GCS; on a machine loaded by others that window
    can pass (seen: "The current node timed out during startup"), so the processes the failed attempt started are
    killed by pid and Ray is started again."""
    import psutil
    import ray

    for attempt in range(1, attempts + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(address="local", **options)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            for p in psutil.Process().children(recursive=True):
                if p.pid not in before:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
            ray.shutdown()


def start_ray(num_cpus: int = 2, metrics_port: int | None = None) -> None:
    os.environ["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = "1"  # the driver too, for tensors it puts
    init_local_ray(num_cpus=num_cpus, namespace="serve", include_dashboard=False, log_to_driver=False,
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
    """Serve, the driver's router loop, then Ray: each even if the one before failed."""
    import ray
    from ray import serve

    try:
        serve.shutdown()  # shuts the driver's cached handles down on the router loop, so that loop goes after it
    finally:
        try:
            stop_router_loop()
        finally:
            ray.shutdown()


def stop_router_loop(timeout_s: float = 10) -> None:
    """End the asyncio loop Serve runs a driver's DeploymentHandles on (`SingletonThreadRouter`: one loop in a daemon
    thread a process, never stopped by serve.shutdown or ray.shutdown). Left running, it keeps calling into Ray's core
    worker after ray.shutdown and while the interpreter exits, where a test run once died of SIGSEGV (exit 139) after
    every test had passed. The next handle starts a new loop."""
    import threading

    from ray.serve._private.router import SingletonThreadRouter

    with SingletonThreadRouter._asyncio_loop_creation_lock:
        loop, SingletonThreadRouter._asyncio_loop = SingletonThreadRouter._asyncio_loop, None
    if loop is None:
        return
    monitor = getattr(SingletonThreadRouter, "_event_loop_monitor", None)
    if monitor is not None:
        loop.call_soon_threadsafe(monitor.stop)  # its task lives on the loop: cancelled there
    loop.call_soon_threadsafe(loop.stop)
    for thread in threading.enumerate():
        if thread.name.endswith("(_run_router_event_loop)"):
            thread.join(timeout_s)
    if not loop.is_running():
        loop.close()

"""A two-node loopback Ray cluster started with `ray start`, its head's GCS backed by a real Redis (GCS fault
tolerance as Ray documents it: RAY_REDIS_ADDRESS and --redis-password on the head), a Serve proxy on every node:
the head's GCS process, or the whole head node, can be killed (kill -9) and brought back while the worker node keeps
serving.

The head runs only Ray's control plane (GCS, the Serve controller, a proxy) with 0 CPUs, as a KubeRay head should;
every crosstrim replica runs on the worker node, whose proxy listens on its own port
(RAY_SERVE_WORKER_PROXY_HTTP_PORT: two proxies on one machine cannot share one). Workers wait
`reconnect_timeout_s` for a lost GCS (RAY_gcs_rpc_server_reconnect_timeout_s) instead of Ray's 60 s.

This process never joins the cluster as a driver (a driver on the head's raylet dies with it): deploys and status
queries run in short-lived subprocesses (`python -m loadtests.headloss deploy|status`). Every process here is found
by the cluster's own temp dir and stopped by PID; nothing else on the machine is touched.
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from deployments.localrun import free_port, load_config
from loadtests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
FRONTEND, DECODER = "crosstrim_frontend", "crosstrim_decoder"
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000, "health_check_failure_threshold": 4}


def ft_config(port: int, source: str = "configs/local-2node.yaml") -> dict:
    """configs/local-2node.yaml with a proxy on every node and every replica on the worker node (the head's 0 CPUs
    take none): one decoder replica, so a restarted controller finds the pool as it left it."""
    config = load_config(ROOT / source, port)
    config["proxy_location"] = "EveryNode"
    for d in config["applications"][0]["deployments"]:
        if d["name"] == "DecoderPool":
            d.pop("autoscaling_config", None)
            d["num_replicas"] = 1
    return config


class HeadLossCluster:
    def __init__(self, redis: RedisServer, worker_cpus: int = 2, reconnect_timeout_s: int = 300,
                 object_store_mb: int = 256):
        # Short: Ray's unix sockets live under it (108-byte path limit).
        self.temp = Path(tempfile.mkdtemp(prefix="ct-ray-", dir="/tmp"))
        self.redis, self.worker_cpus = redis, worker_cpus
        self.reconnect_timeout_s, self.object_store = reconnect_timeout_s, object_store_mb * 2**20
        self.gcs_port, self.http_port, self.worker_http_port = free_port(), free_port(), free_port()
        self.namespace = f"crosstrim-{secrets.token_hex(4)}"  # this cluster's keys in Redis
        self.head_roots: set[int] = set()
        self.worker_roots: set[int] = set()
        self.relaunched: list[subprocess.Popen] = []
        # Token authentication on, with this cluster's own token: RAY_AUTH_MODE alike for the nodes and every CLI or
        # driver (left unset, Ray turns it on or not depending on whether ~/.ray/auth_token happens to exist).
        self.token_path = self.temp / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def head_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def worker_url(self) -> str:
        return f"http://127.0.0.1:{self.worker_http_port}"

    def env(self, **extra: str) -> dict:
        env = dict(os.environ)
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            env.pop(name, None)
        env |= {"PYTHONPATH": str(ROOT), "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
                "RAY_gcs_rpc_server_reconnect_timeout_s": str(self.reconnect_timeout_s),
                "RAY_external_storage_namespace": self.namespace, "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                # A raylet waits this long for its agents (Ray's default is too short on a loaded 2-core machine).
                "RAY_agent_register_timeout_ms": "300000"}
        return env | extra

    def _ports(self) -> list[str]:
        """Every port a node opens, free ones: two nodes on one machine would collide on Ray's fixed defaults."""
        args = []
        for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                     "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
            args += [flag, str(free_port())]
        return args

    def _ray_start(self, temp: Path, args: list[str], env: dict, attempts: int = 3) -> set[int]:
        """`ray start ARGS`; the new processes. A raylet that does not register within Ray's fixed 30 s (a loaded
        machine) fails the command: its processes are killed and the node started again."""
        for attempt in range(1, attempts + 1):
            before = self._tree(self._mine())
            cmd = ["ray", "start", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp),
                   "--object-store-memory", str(self.object_store), "--disable-usage-stats", *self._ports(), *args]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
            new = self._mine() - before
            if r.returncode == 0:
                return new
            self._kill(self._tree(new))
            if attempt == attempts:
                raise RuntimeError(f"ray start {args[0]} failed ({r.returncode}): {r.stderr[-1500:]}")

    def start_head(self) -> None:
        """The head (again): a head pod that comes back has a fresh disk, not the dead one's record of the cluster
        it ran (`ray start` refuses to start a head at an address it finds recorded there while the worker node's
        processes still name that address)."""
        temp = self.temp / "head"
        (temp / "ray_current_cluster").unlink(missing_ok=True)
        args = ["--head", "--port", str(self.gcs_port), "--num-cpus", "0", "--include-dashboard", "false",
                "--ray-client-server-port", str(free_port()), "--redis-password", self.redis.password,
                "--system-config", json.dumps(FAST_NODE_DEATH)]
        self.head_roots = self._ray_start(temp, args, self.env(RAY_REDIS_ADDRESS=self.redis.address))

    def start_worker(self) -> None:
        resources = {FRONTEND: 100, DECODER: 1}
        self.worker_roots = self._ray_start(self.temp / "worker", ["--address", self.address, "--num-cpus", str(self.worker_cpus),
                         "--resources", json.dumps(resources)],
                        self.env(RAY_SERVE_WORKER_PROXY_HTTP_PORT=str(self.worker_http_port)))

    def start(self) -> "HeadLossCluster":
        """The head, Serve's controller and the head's proxy, then the worker node. Serve started with both nodes
        up makes a proxy on each and kills the worker's (no replica there yet), failing serve.start's wait."""
        self.start_head()
        self.driver("start", json.dumps({"proxy_location": "EveryNode",
                                         "http_options": {"host": "127.0.0.1", "port": self.http_port}}))
        self.start_worker()
        return self

    # ---- processes (only this cluster's: their command lines name its temp dir, or they descend from one that does)

    def _mine(self) -> set[int]:
        mark = str(self.temp)
        found = set()
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(mark in arg for arg in p.info["cmdline"] or ()):
                    found.add(p.info["pid"])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    @staticmethod
    def _tree(roots: set[int]) -> set[int]:
        out = set()
        for pid in roots:
            try:
                p = psutil.Process(pid)
                out |= {pid, *(c.pid for c in p.children(recursive=True))}
            except psutil.NoSuchProcess:
                continue
        return out

    def head_processes(self) -> set[int]:
        roots = self.head_roots | {p.pid for p in self.relaunched}
        return self._tree(roots) - self._tree(self.worker_roots)

    def gcs_pid(self) -> int:
        for pid in self.head_processes():
            try:
                if psutil.Process(pid).name() == "gcs_server":
                    return pid
            except psutil.NoSuchProcess:
                continue
        raise RuntimeError("the head has no gcs_server process")

    @staticmethod
    def _kill(pids: set[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        psutil.wait_procs([p for p in map(_process, pids) if p], timeout=10)

    def kill_gcs(self) -> tuple[list[str], dict, str]:
        """kill -9 of the head's gcs_server; its command line, environment and cwd, to start it again as Ray did."""
        pid = self.gcs_pid()
        p = psutil.Process(pid)
        how = (p.cmdline(), p.environ(), p.cwd())
        self._kill({pid})
        return how

    def restart_gcs(self, how: tuple[list[str], dict, str]) -> None:
        cmdline, env, cwd = how
        self.relaunched.append(subprocess.Popen(cmdline, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                start_new_session=True))

    def kill_head(self) -> int:
        """kill -9 of every process of the head node (GCS, raylet, Serve controller, its proxy, agents); how many."""
        pids = self.head_processes()
        self._kill(pids)
        for p in self.relaunched:
            p.wait(5)
        self.relaunched, self.head_roots = [], set()
        return len(pids)

    def stop(self) -> None:
        for _ in range(2):  # a second pass for any worker a raylet started while the first one ran
            self._kill(self._tree(self._mine() | self.head_roots | self.worker_roots |
                                  {p.pid for p in self.relaunched if p.poll() is None}))
        for p in self.relaunched:
            p.wait(5)
        shutil.rmtree(self.temp, ignore_errors=True)

    # ---- the Serve app, through short-lived drivers

    def driver(self, *args: str, timeout_s: float = 300) -> dict:
        """`python -m loadtests.headloss ARGS --address ...` in a subprocess; its JSON answer."""
        cmd = [sys.executable, "-m", "loadtests.headloss", *args, "--address", self.address]
        r = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                           check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def deploy(self, config: dict, timeout_s: float = 400) -> dict:
        path = self.temp / "serve-config.json"
        path.write_text(json.dumps(config))
        return self.driver("deploy", str(path), timeout_s=timeout_s)

    def status(self, timeout_s: float = 60) -> dict:
        return self.driver("status", timeout_s=timeout_s)


def wait_proxy(url: str, timeout_s: float = 120) -> float:
    """Seconds until the Serve proxy at `url` answers its health route (a proxy starts after the app is RUNNING)."""
    import httpx

    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(url + "/-/healthz", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"no Serve proxy at {url} after {timeout_s}s")
        time.sleep(0.5)


def _process(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def app_status(app: str = "crosstrim") -> dict:
    """The application's status and each deployment's replica states, as a connected driver sees them."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {"status": "MISSING", "deployments": {}}
    return {"status": str(status.status), "deployments": {
        name: {str(k): int(v) for k, v in d.replica_states.items()} for name, d in status.deployments.items()}}


def _driver_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.headloss")
    p.add_argument("command", choices=["start", "deploy", "status"])
    p.add_argument("config", nargs="?", help="start: the options as JSON; deploy: a Serve config file (JSON)")
    p.add_argument("--address", required=True)
    args = p.parse_args(argv)

    import ray

    ray.init(address=args.address, namespace="serve", log_to_driver=False)
    from ray import serve

    if args.command == "start":
        serve.start(**json.loads(args.config))
        print(json.dumps({"started": True}))
    elif args.command == "deploy":
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(json.loads(Path(args.config).read_text()))
        _get_global_client().deploy_apps(schema)  # what `serve deploy` has the controller do
        t0 = time.monotonic()
        while (s := app_status())["status"] not in ("ApplicationStatus.RUNNING", "RUNNING"):
            if "FAILED" in s["status"]:
                raise RuntimeError(f"deploy failed: {serve.status()}")
            time.sleep(0.5)
        print(json.dumps(s | {"deploy_s": round(time.monotonic() - t0, 1)}))
    else:
        print(json.dumps(app_status()))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(_driver_main())

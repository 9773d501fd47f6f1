"""Two real Ray nodes on loopback (ray.cluster_utils.Cluster) with configs/local-2node.yaml's placement resources:
node A (head) runs the frontend stages, node B the decoder pool; node B can be killed (kill -9) and started again."""

import os

from deployments.localrun import deploy, free_port, load_config

# The GCS declares a node dead after 4 failed pings 1 s apart (defaults: 5 x 3 s), as configs/local-2node.yaml says;
# a ping may take 2 s, so a raylet on a loaded machine is not declared dead while it starts.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000, "health_check_failure_threshold": 4}
LOOPBACK = "127.0.0.1"  # both nodes: nothing listens beyond loopback
FRONTEND, DECODER = "crosstrim_frontend", "crosstrim_decoder"


class TwoNodes:
    """`head_decoder_slots=1` lets the decoder pool's second replica run on node A (the autoscaling run)."""

    def __init__(self, head_decoder_slots: int = 0, object_store_mb: int = 256, node_cpus: int = 1):
        self.head_decoder_slots, self.object_store = head_decoder_slots, object_store_mb * 2**20
        self.node_cpus = node_cpus
        self.cluster = self.node_b = None
        self.port = None

    def start(self) -> "TwoNodes":
        import ray
        from ray import serve
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        os.environ["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = "1"  # every node's workers inherit the driver's env
        # Ray resolves 127.0.0.1 to the host's outward IP unless told it is a one-machine "cluster": every process
        # (driver, raylets, workers) then binds and dials loopback only.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported Ray before the variable was set
        head = {FRONTEND: 100} | ({DECODER: self.head_decoder_slots} if self.head_decoder_slots else {})
        head_args = {"num_cpus": self.node_cpus, "resources": head, "node_ip_address": LOOPBACK,
                     "object_store_memory": self.object_store, "include_dashboard": False,
                     "_system_config": FAST_NODE_DEATH | {"metrics_report_interval_ms": 1000}}
        for attempt in range(3):  # a raylet gives up after 30 s when its agents start slowly (a busy machine)
            self.cluster = Cluster(shutdown_at_exit=True)
            try:
                self.cluster.add_node(**head_args)
                break
            except Exception:
                self.cluster.shutdown()
                if attempt == 2:
                    raise
        ray.init(address=self.cluster.address, namespace="serve", log_to_driver=False)
        # Serve (controller and the one HeadOnly proxy) before node B joins: started with two nodes up, Serve makes a
        # proxy on each and then kills node B's, failing serve.start's readiness wait.
        self.port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": LOOPBACK, "port": self.port})
        self.add_decoder_node()
        return self

    def add_decoder_node(self):
        self.node_b = self.cluster.add_node(num_cpus=self.node_cpus, resources={DECODER: 1},
                                            node_ip_address=LOOPBACK, object_store_memory=self.object_store)
        return self.node_b

    def kill_decoder_node(self) -> None:
        """kill -9 of node B's raylet and every process on it (its replicas die with it)."""
        self.cluster.remove_node(self.node_b, allow_graceful=False)
        self.node_b = None

    def deploy(self, config_path: str = "configs/local-2node.yaml", edit=None, timeout_s: float = 300) -> str:
        """Deploy the config (HTTP on a free loopback port); `edit(config)` may change it first. The base URL."""
        config = load_config(config_path, self.port)
        assert config.get("proxy_location") == "HeadOnly", "one proxy: on one machine they would share the port"
        if edit:
            edit(config)
        return deploy(config, config["applications"][0]["name"], timeout_s)

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()
                self.cluster = None

    def __enter__(self) -> "TwoNodes":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def replica_nodes(app: str, deployment: str) -> list[str]:
    """Node ids of a deployment's live replica actors (read from the GCS: no dashboard needed)."""
    from ray._private.state import actors

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["Address"]["NodeID"] for a in actors().values()
                  if a["State"] == "ALIVE" and (a.get("Name") or "").startswith(prefix))


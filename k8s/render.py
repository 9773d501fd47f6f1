"""Render each RayService's `serveConfigV2` under k8s/ from its Serve config under configs/ (one source of truth), the
API keys' environment variable (the config's `api_key_env`, from the Secret crosstrim-api-keys) on the Ray
containers of the groups that can run the ingress, and GCS fault tolerance (`gcsFaultToleranceOptions`) on a Redis:
either k8s/gcs-redis.yaml (a Deployment and Service, `in-cluster`) or an `external` one whose address and password
come from the Secret crosstrim-redis (k8s/gcs_redis.py).

    python k8s/render.py          # rewrite the serveConfigV2 blocks, the env blocks and the Redis parts in place
    python k8s/render.py --check  # exit 1 when a manifest differs from its render (tests/deploy/test_k8s*.py too)
    python k8s/render.py --redis external   # render every manifest with that Redis instead of its own choice
"""

import argparse
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python k8s/render.py` from a checkout: deployments.config for api_key_env's default
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gcs_redis  # noqa: E402 (k8s/gcs_redis.py beside this script, found once its folder is on the path)

STAGE_LABEL = "crosstrim.io/stage"  # Ray node label on each stage's worker group (KubeRay `labels`)
STAGES = ("ingress", "encoder", "trimmer", "decoder")  # found in the deployment names, e.g. VisionEncoder
# The ingress reads its API keys (comma-separated) from the env var `api_key_env` names; on k8s from this Secret's
# key. Optional: without the Secret the pods start and the API is open (the CPU demo); k8s/README.md creates it.
API_KEYS_SECRET = {"name": "crosstrim-api-keys", "key": "keys"}
ENV_MARK = "env:  # rendered by k8s/render.py"
# A rendered env block: its key line and the list items under it (same indent, "- " or deeper).
ENV_BLOCK = re.compile(r"^(?P<indent> *)" + re.escape(ENV_MARK) + r".*\n(?:(?P=indent)(?:- |  ).*\n)*", re.MULTILINE)
# Each pod template's container list and its first (the Ray) container's name line.
CONTAINERS = re.compile(r"^(?P<indent> *)containers:\n(?P=indent)- name: (?P<name>\S+).*\n", re.MULTILINE)


@dataclass(frozen=True)
class Target:
    """A RayService manifest, the Serve config it embeds, and the only things Kubernetes changes in it."""

    manifest: str  # paths relative to the repo root
    config: str
    pin_stages: bool = False  # pin each stage's replicas to its worker group with a Ray label selector
    redis: str = "external"  # the GCS's Redis: one of gcs_redis.MODES


TARGETS = (
    # Production: a managed, highly available Redis outside the cluster (its address in the Secret).
    Target("k8s/rayservice-llama-3.2-11b-vision.yaml", "configs/llama-3.2-11b-vision.yaml", pin_stages=True),
    Target("k8s/rayservice-llama-3.2-90b-vision.yaml", "configs/llama-3.2-90b-vision.yaml", pin_stages=True),
    # The laptop demo brings its own Redis.
    Target("k8s/rayservice-tiny-cpu.yaml", "configs/local-2node.yaml", redis="in-cluster"),
)

# `serveConfigV2: |` and the indented lines (or blank lines) of its block scalar.
BLOCK = re.compile(r"^(?P<indent> *)serveConfigV2: \|\n(?P<body>(?:(?P=indent) +\S.*\n|[ \t]*\n)*)", re.MULTILINE)


def stage_of(deployment_name: str) -> str | None:
    name = deployment_name.lower()
    return next((stage for stage in STAGES if stage in name), None)


def serve_config(target: Target) -> dict:
    """The Serve config file with the target's Kubernetes changes applied."""
    cfg = yaml.safe_load((ROOT / target.config).read_text())
    # KubeRay's serve Service sends traffic to port 8000 of every pod whose Serve proxy is healthy.
    cfg["proxy_location"] = "EveryNode"
    cfg["http_options"] = (cfg.get("http_options") or {}) | {"host": "0.0.0.0", "port": 8000}
    for app in cfg["applications"]:
        # The image has the package installed: a working_dir upload would shadow it with the head's files.
        (app.get("runtime_env") or {}).pop("working_dir", None)
        if target.pin_stages:
            pinned = [d for d in app.get("deployments", []) if stage_of(d["name"])]
            if {stage_of(d["name"]) for d in pinned} != set(STAGES):
                raise ValueError(f"{target.config}: application {app['name']!r} must list one deployment per stage "
                                 f"{STAGES} to pin them to worker groups; it lists {[d['name'] for d in pinned]}")
            for d in pinned:
                d.setdefault("ray_actor_options", {})["label_selector"] = {STAGE_LABEL: stage_of(d["name"])}
    return cfg


def render_block(cfg: dict, indent: str) -> str:
    text = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False, width=120)
    return "".join(f"{indent}  {line}\n" if line else "\n" for line in text.splitlines())


def render_manifest(text: str, cfg: dict) -> str:
    """The manifest text with its serveConfigV2 block replaced by `cfg`; everything else is left as written."""
    match = BLOCK.search(text)
    if match is None:
        raise ValueError("manifest has no `serveConfigV2: |` block")
    body = render_block(cfg, match["indent"])
    return text[:match.start("body")] + body + text[match.end("body"):]


def api_key_envs(cfg: dict) -> list[str]:
    from deployments.config import AppConfig  # the default name lives there

    default = AppConfig.model_fields["api_key_env"].default
    return sorted({(app.get("args") or {}).get("api_key_env", default) for app in cfg["applications"]})


def can_host(group: dict, ray_actor_options: dict) -> bool:
    """A pod of the group may run the replica: Ray labels match its label_selector, and the group advertises its
    custom resources (and, if it overrides CPU, enough CPU)."""
    labels, advertised = group.get("labels") or {}, group.get("resources") or {}
    wanted = dict(ray_actor_options.get("resources") or {})
    if "CPU" in advertised:
        wanted["CPU"] = ray_actor_options.get("num_cpus", 1)
    return (all(labels.get(k) == v for k, v in (ray_actor_options.get("label_selector") or {}).items())
            and all(float(advertised.get(k, 0)) >= float(v) for k, v in wanted.items()))


def cluster_groups(cluster: dict) -> list[tuple[str, dict]]:
    """(name, group spec) of the head ("head") and each worker group of a RayCluster spec."""
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]


def ingress_groups(cluster: dict, cfg: dict) -> list[str]:
    """The head ("head") and worker groups a pod of which can run an Ingress replica of `cfg`."""
    options = [d.get("ray_actor_options") or {} for app in cfg["applications"] for d in app.get("deployments", [])
               if stage_of(d["name"]) == "ingress"] or [{}]
    return [name for name, group in cluster_groups(cluster) if any(can_host(group, opts) for opts in options)]


def api_key_env(names: list[str]) -> list[str]:
    ref = ", ".join(f"{k}: {v}" for k, v in API_KEYS_SECRET.items())
    lines = []
    for name in names:
        lines += [f"- name: {name}", "  valueFrom:", f"    secretKeyRef: {{{ref}, optional: true}}"]
    return lines


def env_block(items: list[str], why: list[str], indent: str) -> str:
    lines = [f"{indent}{ENV_MARK} ({'; '.join(why)})"] + [indent + line for line in items]
    return "".join(line + "\n" for line in lines)


def render_env(text: str, cfg: dict, redis: str) -> str:
    """The manifest text with an env block on the Ray container of each group that needs one (right after its
    image lines): the API keys on the groups that can run the ingress, the external Redis' address on the head."""
    text = ENV_BLOCK.sub("", text)
    cluster = yaml.safe_load(text)["spec"]["rayClusterConfig"]
    groups = cluster_groups(cluster)
    found = list(CONTAINERS.finditer(text, text.index("rayClusterConfig:")))
    if [m["name"] for m in found] != [g["template"]["spec"]["containers"][0]["name"] for _, g in groups]:
        raise ValueError("cannot find each group's container list (`containers:` then `- name:` on the next line)")
    wanted = set(ingress_groups(cluster, cfg))
    for (name, group), match in reversed(list(zip(groups, found))):
        items, why = [], []
        if name in wanted:
            items, why = api_key_env(api_key_envs(cfg)), ["API keys, the config's api_key_env"]
        if name == "head" and gcs_redis.head_env(redis):
            items, why = items + gcs_redis.head_env(redis), why + [gcs_redis.HEAD_ENV_WHY]
        if not items:
            continue
        if "env" in group["template"]["spec"]["containers"][0]:
            raise ValueError(f"{name}: the Ray container has its own env; render.py writes the whole env list")
        indent = match["indent"] + "  "
        at = match.end()
        while text.startswith(indent + "image", at):  # image, imagePullPolicy
            at = text.index("\n", at) + 1
        text = text[:at] + env_block(items, why, indent) + text[at:]
    return text


def render(text: str, target: Target) -> str:
    cfg = serve_config(target)
    text = gcs_redis.render_ft(render_manifest(text, cfg), target.redis)
    return render_env(text, cfg, target.redis)


def write_or_check(path: Path, text: str, check: bool) -> int:
    """A wholly generated file: 1 when it differs and `check`, else (re)written; 0."""
    name = path.relative_to(ROOT)
    if path.is_file() and path.read_text() == text:
        print(f"ok   {name}")
        return 0
    if check:
        print(f"DRIFT {name}: run python k8s/render.py")
        return 1
    path.write_text(text)
    print(f"wrote {name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report drift instead of rewriting")
    parser.add_argument("--redis", choices=gcs_redis.MODES, help="the GCS's Redis for every manifest (default: each "
                                                                 "manifest's own: external for the GPU ones)")
    args = parser.parse_args(argv)
    drift = 0
    for target in TARGETS:
        target = replace(target, redis=args.redis or target.redis)
        manifest, config = ROOT / target.manifest, ROOT / target.config
        if not config.is_file():
            print(f"skip {target.manifest}: {target.config} does not exist yet")
            continue
        text = manifest.read_text()
        rendered = render(text, target)
        if rendered == text:
            print(f"ok   {target.manifest}")
        elif args.check:
            drift += 1
            print(f"DRIFT {target.manifest}: differs from {target.config}; run python k8s/render.py")
        else:
            manifest.write_text(rendered)
            print(f"wrote {target.manifest} from {target.config}")
    drift += write_or_check(ROOT / gcs_redis.REDIS_MANIFEST, gcs_redis.redis_manifest(), args.check)
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())

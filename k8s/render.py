"""Render each RayService's `serveConfigV2` under k8s/ from its Serve config under configs/ (one source of truth).

    python k8s/render.py          # rewrite the serveConfigV2 blocks in place
    python k8s/render.py --check  # exit 1 when a manifest differs from its render (tests/test_k8s.py checks the same)
"""

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGE_LABEL = "crosstrim.io/stage"  # Ray node label on each stage's worker group (KubeRay `labels`)
STAGES = ("ingress", "encoder", "trimmer", "decoder")  # found in the deployment names, e.g. VisionEncoder


@dataclass(frozen=True)
class Target:
    """A RayService manifest, the Serve config it embeds, and the only things Kubernetes changes in it."""

    manifest: str  # paths relative to the repo root
    config: str
    pin_stages: bool = False  # pin each stage's replicas to its worker group with a Ray label selector


TARGETS = (
    Target("k8s/rayservice-llama-3.2-11b-vision.yaml", "configs/llama-3.2-11b-vision.yaml", pin_stages=True),
    Target("k8s/rayservice-llama-3.2-90b-vision.yaml", "configs/llama-3.2-90b-vision.yaml", pin_stages=True),
    Target("k8s/rayservice-tiny-cpu.yaml", "configs/local-2node.yaml"),
)

# `serveConfigV2: |` and the indented lines (or blank lines) of its block scalar.
BLOCK = re.compile(r"^(?P<indent> *)serveConfigV2: \|\n(?P<body>(?:(?P=indent) +\S.*\n|[ \t]*\n)*)", re.M)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report drift instead of rewriting")
    args = parser.parse_args(argv)
    drift = 0
    for target in TARGETS:
        manifest, config = ROOT / target.manifest, ROOT / target.config
        if not config.is_file():
            print(f"skip {target.manifest}: {target.config} does not exist yet")
            continue
        text = manifest.read_text()
        rendered = render_manifest(text, serve_config(target))
        if rendered == text:
            print(f"ok   {target.manifest}")
        elif args.check:
            drift += 1
            print(f"DRIFT {target.manifest}: differs from {target.config}; run python k8s/render.py")
        else:
            manifest.write_text(rendered)
            print(f"wrote {target.manifest} from {target.config}")
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())

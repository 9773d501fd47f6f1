"""k8s/ against the project: image tags and versions match the pins, the Docker context holds what the manifests
use, the batch RayJob and the locust Job run real commands of ours."""

import argparse
import importlib
import json
import re
import shlex
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from tests.deploy.test_k8s import (
    DOCS,
    IMAGE_ROOT,
    KUBERAY_KINDS,
    RAYSERVICES,
    ROOT,
    by_file,
    capacity_problems,
    cluster_spec,
    containers,
    doc_id,
    groups,
    mounted,
    pod_templates,
    serve_config,
)

# ------------------------------------------------------------------------------------------- versions and image

def pinned_ray() -> str:
    constraints = re.search(r"^ray==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)[1]
    pyproject = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert constraints == pyproject, (constraints, pyproject)
    return constraints


def project_version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]


PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"  # the interpreter the project is tested with
IMAGE_TAG = re.compile(r"(?:[\w.:-]+/)*crosstrim:"  # an optional registry, then the tag the Dockerfile documents
                       r"(?P<version>[\w.]+)-ray(?P<ray>[\d.]+)-(?P<py>py\d+)-(?P<flavour>gpu|cpu)$")


def test_dockerfile_matches_pins():
    dockerfile = (ROOT / "Dockerfile").read_text()
    ray = pinned_ray()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)[1]
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    tags = re.findall(r"rayproject/ray:([\w.-]+)", dockerfile)
    assert base == f"rayproject/ray:{ray}-{PY_TAG}-gpu" and tags
    for tag in tags:  # the default and the CPU variant in the build instructions
        assert re.fullmatch(rf"{re.escape(ray)}-{PY_TAG}-(gpu|cpu)", tag), tag
    install = re.search(r"^RUN pip install .*$", dockerfile, re.M)[0]
    assert "-c constraints.txt" in install and install.rstrip(" \\").endswith(" ."), install
    for tag in re.findall(r"-t (crosstrim:\S+)", dockerfile):
        m = IMAGE_TAG.match(tag)
        assert m and (m["version"], m["ray"], m["py"]) == (project_version(), ray, PY_TAG), tag
    from packaging.specifiers import (
        SpecifierSet,  # the pinned Python is one the package supports
    )

    requires = re.search(r'^requires-python = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in SpecifierSet(requires)


@pytest.mark.parametrize("item", [(n, d) for n, _, d in DOCS], ids=doc_id)
def test_manifest_versions_match_pins(item):
    _, doc = item
    ray = pinned_ray()
    if doc["kind"] in KUBERAY_KINDS:
        assert cluster_spec(doc)["rayVersion"] == ray
    for name, template in pod_templates(doc):
        gpus = any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers(template))
        for c in containers(template):
            m = IMAGE_TAG.match(c["image"])
            assert m, f"{name}/{c['name']}: {c['image']} is not the crosstrim image"
            assert (m["version"], m["ray"], m["py"]) == (project_version(), ray, PY_TAG), c["image"]
            if gpus:
                assert m["flavour"] == "gpu", f"{name}/{c['name']} asks for a GPU but runs {c['image']}"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern (Go filepath.Match, plus **) matches the path or one of its parent directories from
    the context root; the last matching pattern wins, `!` re-includes."""
    def regex(pattern: str) -> re.Pattern:
        out = re.escape(pattern.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        return re.compile(out.replace(r"\*", "[^/]*").replace(r"\?", "[^/]"))
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(regex(pattern.lstrip("!")).fullmatch(p) for p in prefixes):
            verdict = not negate
    return verdict


def test_docker_context_has_what_the_manifests_use():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    needed = ["pyproject.toml", "constraints.txt", "README.md", "deployments/app.py", "pipeline/cli.py",
              "pipeline/assets/tiny-mllama-vqa/model.safetensors",  # the demo's model
              "configs/batch-gpu.yaml", "loadtests/locustfile.py"]  # the RayJob's config, the locust Job's file
    assert [p for p in needed if dockerignored(p, patterns)] == []
    assert [p for p in needed if not (ROOT / p).exists()] == []
    kept_out = ["tests/test_k8s.py", ".git/config", "pipeline/__pycache__/cli.cpython-311.pyc", "out/rows.parquet"]
    assert all(dockerignored(p, patterns) for p in kept_out)  # the matcher (and the file) can exclude


# ------------------------------------------------------------------------------------------------ batch RayJob

def crosstrim_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosstrim")
    sub = parser.add_subparsers(dest="command", required=True)
    importlib.import_module("pipeline.batch.job").add_args(sub)
    return parser


def test_rayjob_runs_crosstrim_batch_from_s3_to_s3():
    job = by_file("rayjob-batch.yaml", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 600 <= spec["activeDeadlineSeconds"] <= 24 * 3600
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["crosstrim", "batch"]
    args = crosstrim_parser().parse_args(argv[1:])  # the real CLI: a renamed flag fails here
    assert args.input.startswith("s3://") and args.output.startswith("s3://") and args.input != args.output
    assert args.model is None or args.model.startswith("s3://"), "weights from S3"
    assert args.config.startswith(IMAGE_ROOT)
    config = ROOT / args.config.removeprefix(IMAGE_ROOT)
    assert config.is_file(), f"{args.config}: no {config.relative_to(ROOT)} in the repo (the image copies it)"


def test_rayjob_pools_fit_its_cluster():
    job = by_file("rayjob-batch.yaml", "RayJob")
    args = crosstrim_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:])
    config = ROOT / args.config.removeprefix(IMAGE_ROOT)
    batch = importlib.import_module("pipeline.batch.job")
    cfg = batch.load_config(str(config))
    consumers = []
    for stage in ("encoder", "trimmer", "decoder"):
        pool = getattr(cfg, stage)
        most = pool.concurrency if isinstance(pool.concurrency, int) else pool.concurrency[1]
        consumers.append((stage, {"CPU": Fraction(str(pool.num_cpus)), "GPU": Fraction(str(pool.num_gpus))}, {}, most))
    consumers.append(("io", {"CPU": Fraction(str(cfg.io_num_cpus))}, {}, 1))
    assert capacity_problems(cluster_spec(job), consumers) == []
    # Where the config caches weights must be a volume (the container's own filesystem is small).
    cache = cfg.model.cache_dir or "/home/ray/.cache/crosstrim"
    for name, group in groups(cluster_spec(job))[1:]:
        assert mounted(cache, group["template"]["spec"]["containers"][0]), (name, cache)
    # The job reads the same S3 mirror of the checkpoint the RayServices serve.
    sources = {app["args"]["model"]["source"] for _, d in RAYSERVICES for app in serve_config(d)["applications"]}
    assert (args.model or cfg.model.source) in sources, (args.model, sources)


# ------------------------------------------------------------------------------------------------- locust Job

def locust_args(container: dict) -> list[str]:
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    expand = lambda s: re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], s)  # noqa: E731  (what the kubelet does)
    return [expand(a) for a in container.get("command", [])[1:] + container.get("args", [])]


# Parsed in a child process: importing locust monkey-patches the standard library with gevent. The locustfile is
# imported first, as locust does, so its own options (--model, ...) are parsed too.
PARSE_LOCUST = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("locustfile", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
from locust.argument_parser import get_parser
o = get_parser(default_config_files=()).parse_args(sys.argv[2:])
keys = ("headless", "host", "num_users", "run_time", "locustfile", "model")
print(json.dumps({k: getattr(o, k, None) for k in keys}))
"""


def parse_locust(locustfile: Path, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PARSE_LOCUST, str(locustfile), *argv], capture_output=True,
                          text=True, timeout=60)


def locust_job() -> tuple[dict, dict, Path]:
    """The Job, its locust container, and the repo's copy of the locustfile it runs."""
    job = by_file("locust-job.yaml", "Job")
    locust = next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "locust")
    path = next(a.partition("=")[2] for a in locust_args(locust) if a.startswith("--locustfile="))
    assert path.startswith(IMAGE_ROOT), path
    locustfile = ROOT / path.removeprefix(IMAGE_ROOT)
    assert locustfile.is_file(), f"{locustfile.relative_to(ROOT)} (the locust Job's locustfile) does not exist"
    return job, locust, locustfile


def test_locust_job_targets_a_rayservice_serve_service():
    job, locust, locustfile = locust_job()
    assert locust["command"] == ["locust"]
    parsed = parse_locust(locustfile, locust_args(locust))
    assert parsed.returncode == 0, parsed.stderr[-2000:]  # the real parser: a misspelt flag fails here
    options = json.loads(parsed.stdout.strip().splitlines()[-1])
    assert options["headless"] and options["run_time"] and options["num_users"] >= 1
    # The host is a RayService's serve Service, and the model its config's served_model_name (else every 404s).
    served = {f"http://{d['metadata']['name']}-serve-svc:8000": app["args"]["served_model_name"]
              for _, d in RAYSERVICES for app in serve_config(d)["applications"]}
    assert options["host"] in served, (options["host"], served)
    assert options["model"] == served[options["host"]], (options["model"], served[options["host"]])
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] > 0

"""GCS fault tolerance in the KubeRay manifests, validated offline: every RayService rendered with each Redis choice
(`in-cluster`: k8s/gcs-redis.yaml; `external`: address and password from the Secret crosstrim-redis) matches the
KubeRay v1.7.0 CRD schema, passes kubernetes-validate and the operator's GCS fault tolerance rules, and its Redis
address and password resolve to something that exists; broken wirings fail."""

import copy
import importlib.util
import re
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
K8S_VERSION = "1.33.0"


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_module("k8s_render", K8S / "render.py")
gcs_redis = sys.modules["gcs_redis"]
RENDERED = [(t, mode, yaml.safe_load(render.render((ROOT / t.manifest).read_text(),
                                                   render.replace(t, redis=mode))))
            for t in render.TARGETS for mode in gcs_redis.MODES]
IDS = [f"{Path(t.manifest).stem}-{mode}" for t, mode, _ in RENDERED]
REDIS_DOCS = [d for d in yaml.safe_load_all((ROOT / gcs_redis.REDIS_MANIFEST).read_text()) if d]


@pytest.fixture(scope="module")
def rayservice_schema(crd_validators):
    """The RayService CRD's schema (k8s/crds/, tests/deploy/conftest.py), unknown fields rejected."""
    return crd_validators["RayService"]


def head_container(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def secret_refs_created_by_readme() -> set[tuple[str, str]]:
    """(secret, key) pairs k8s/README.md's `kubectl create secret generic` commands create."""
    readme = (K8S / "README.md").read_text().replace("\\\n", " ")
    pairs = set()
    for name, rest in re.findall(r"kubectl create secret generic ([a-z0-9-]+)([^\n]*)", readme):
        pairs |= {(name, key) for key in re.findall(r"--from-literal=([A-Za-z0-9_]+)=", rest)}
    return pairs


def ft_problems(doc: dict, redis_docs: list[dict]) -> list[str]:
    """KubeRay v1.7's GCS fault tolerance rules (ValidateRayClusterSpec) and the wiring they leave to us."""
    cluster, problems = doc["spec"]["rayClusterConfig"], []
    ft = cluster.get("gcsFaultToleranceOptions")
    if not ft:
        return ["no gcsFaultToleranceOptions"]
    head = cluster["headGroupSpec"]
    env = {e["name"]: e for e in head_container(doc).get("env", [])}
    for name in ("RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "REDIS_USERNAME"):
        if name in env:
            problems.append(f"head env {name} is set; KubeRay wants it in gcsFaultToleranceOptions")
    for key in ("redis-password", "redis-username"):
        if (head.get("rayStartParams") or {}).get(key):
            problems.append(f"rayStartParams {key} with gcsFaultToleranceOptions")
    if {"ray.io/ft-enabled", "ray.io/external-storage-namespace"} & set(doc["metadata"].get("annotations") or {}):
        problems.append("the ft annotations and gcsFaultToleranceOptions are both set")
    created = secret_refs_created_by_readme()
    ref = ((ft.get("redisPassword") or {}).get("valueFrom") or {}).get("secretKeyRef")
    if not ref or (ref["name"], ref["key"]) not in created:
        problems.append(f"redisPassword is not from a Secret key the README creates: {ref}")
    address = ft.get("redisAddress", "")
    expanded = re.fullmatch(r"\$\((\w+)\)", address)
    if expanded:  # external: Kubernetes expands it from the head's env var, which must come from a Secret
        src = ((env.get(expanded[1]) or {}).get("valueFrom") or {}).get("secretKeyRef")
        if not src or (src["name"], src["key"]) not in created:
            problems.append(f"redisAddress {address}: the head has no such env var from a Secret the README creates")
    else:  # in-cluster: a Service in k8s/gcs-redis.yaml on that port, selecting the Redis pods
        host, _, port = address.partition(":")
        services = [d for d in redis_docs if d["kind"] == "Service" and d["metadata"]["name"] == host]
        pods = [d["spec"]["template"] for d in redis_docs if d["kind"] == "Deployment"]
        if not services or int(port or 0) not in [p["port"] for p in services[0]["spec"]["ports"]]:
            problems.append(f"redisAddress {address}: no such Service and port in {gcs_redis.REDIS_MANIFEST}")
        elif not any(services[0]["spec"]["selector"].items() <= p["metadata"]["labels"].items() for p in pods):
            problems.append(f"Service {host} selects no Redis pod")
        else:
            redis_env = {e["name"]: e for p in pods for e in p["spec"]["containers"][0].get("env", [])}
            same = ((redis_env.get("REDIS_PASSWORD") or {}).get("valueFrom") or {}).get("secretKeyRef")
            if same != ref:
                problems.append(f"the Redis pods' password ({same}) is not the GCS's ({ref})")
    return problems


def head_serves_nothing_problems(doc: dict) -> list[str]:
    """The data plane outlives the head: no replica on it, a proxy on every node."""
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    problems = [] if serve_cfg.get("proxy_location") == "EveryNode" else ["proxies only on the head"]
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    if str((head.get("resources") or {}).get("CPU", head.get("rayStartParams", {}).get("num-cpus"))) != "0":
        problems.append("the head advertises CPUs: replicas would die with it")
    return problems


@pytest.mark.parametrize("item", RENDERED, ids=IDS)
def test_rendered_ft_matches_crd_schema(rayservice_schema, item):
    _, _, doc = item
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in rayservice_schema.iter_errors(doc)]
    assert errors == []


@pytest.mark.parametrize("item", RENDERED, ids=IDS)
def test_rendered_ft_follows_operator_rules_and_resolves(item):
    _, _, doc = item
    assert ft_problems(doc, REDIS_DOCS) == []
    assert head_serves_nothing_problems(doc) == []


@pytest.mark.parametrize("item", RENDERED, ids=IDS)
def test_rendered_head_pod_passes_kubernetes_validate(item):
    _, _, doc = item
    template = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "head"},
                                  "template": template}, K8S_VERSION, strict=True)


@pytest.mark.parametrize("doc", REDIS_DOCS, ids=lambda d: d["kind"])
def test_redis_manifest_passes_kubernetes_validate(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_each_manifest_is_rendered_with_its_own_choice():
    chosen = {Path(t.manifest).name: t.redis for t in render.TARGETS}
    assert chosen["rayservice-tiny-cpu.yaml"] == "in-cluster"  # the demo brings its Redis
    assert {chosen[n] for n in chosen if "llama" in n} == {"external"}  # production: a managed HA Redis
    for t in render.TARGETS:
        ft = yaml.safe_load((ROOT / t.manifest).read_text())["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
        assert ft["redisAddress"].startswith("$(") == (t.redis == "external"), (t.manifest, ft)
        assert "externalStorageNamespace" not in ft  # KubeRay's per-cluster default keeps upgrades apart


def test_broken_ft_wiring_is_caught():
    _, _, doc = next(r for r in RENDERED if r[1] == "external")
    env_too = copy.deepcopy(doc)
    head_container(env_too)["env"].append({"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"})
    assert any("RAY_REDIS_ADDRESS" in p for p in ft_problems(env_too, REDIS_DOCS))
    no_env = copy.deepcopy(doc)
    head_container(no_env)["env"] = [e for e in head_container(no_env)["env"] if e["name"] != gcs_redis.ADDRESS_ENV]
    assert any("no such env var" in p for p in ft_problems(no_env, REDIS_DOCS))
    literal = copy.deepcopy(doc)
    literal["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisPassword"] = {"value": "hunter2"}
    assert any("redisPassword" in p for p in ft_problems(literal, REDIS_DOCS))
    _, _, local = next(r for r in RENDERED if r[1] == "in-cluster")
    wrong_port = copy.deepcopy(local)
    wrong_port["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"] = "crosstrim-redis:6380"
    assert any("no such Service" in p for p in ft_problems(wrong_port, REDIS_DOCS))
    other_pods = copy.deepcopy(REDIS_DOCS)
    next(d for d in other_pods if d["kind"] == "Service")["spec"]["selector"] = {"app": "nothing"}
    assert any("selects no Redis pod" in p for p in ft_problems(local, other_pods))
    del wrong_port["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft_problems(wrong_port, REDIS_DOCS) == ["no gcsFaultToleranceOptions"]
    serving_head = copy.deepcopy(local)
    serving_head["spec"]["rayClusterConfig"]["headGroupSpec"]["resources"] = {"CPU": "2"}
    assert head_serves_nothing_problems(serving_head)


def test_broken_ft_fails_crd_schema(rayservice_schema):
    _, _, doc = RENDERED[0]
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisPasword"] = {"value": "typo"}
    assert list(rayservice_schema.iter_errors(bad))
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["backend"] = "etcd"
    assert list(rayservice_schema.iter_errors(bad))


def test_render_check_catches_a_stale_redis_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "ROOT", tmp_path)
    (tmp_path / "k8s").mkdir()
    stale = tmp_path / gcs_redis.REDIS_MANIFEST
    stale.write_text(gcs_redis.redis_manifest().replace("redis:7.0.15", "redis:6"))
    assert render.write_or_check(stale, gcs_redis.redis_manifest(), check=True) == 1
    assert render.write_or_check(stale, gcs_redis.redis_manifest(), check=False) == 0
    assert stale.read_text() == gcs_redis.redis_manifest()

"""k8s/ manifests validated offline: KubeRay CRD schemas (v1.7.0), kubernetes-validate, the operator's own rules,
the embedded Serve configs, resource fit, versions against the project's pins; broken manifests must fail."""

import copy
import importlib
import importlib.util
import re
import sys
from fractions import Fraction
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = K8S / "crds"  # KubeRay v1.7.0's CRDs, unchanged (k8s/crds/README.md)
IMAGE_ROOT = "/home/ray/crosstrim/"  # the Dockerfile's WORKDIR: repo files are there in the image
K8S_VERSION = "1.33.0"  # kubernetes-validate ships schemas for 1.25 ... 1.37
KUBERAY_KINDS = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml",
                 "RayCluster": "ray.io_rayclusters.yaml"}



def load_render():
    """k8s/render.py (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    module = sys.modules["k8s_render"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_render()


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


MANIFESTS = sorted(K8S.glob("*.yaml"))
DOCS = [(p.name, i, d) for p in MANIFESTS for i, d in enumerate(load_docs(p))]
KUBERAY_DOCS = [(n, d) for n, _, d in DOCS if d["kind"] in KUBERAY_KINDS]
CORE_DOCS = [(n, d) for n, _, d in DOCS if d["kind"] not in KUBERAY_KINDS]
RAYSERVICES = [(n, d) for n, d in KUBERAY_DOCS if d["kind"] == "RayService"]


def doc_id(item) -> str:
    return f"{item[0]}:{item[1]['kind']}/{item[1]['metadata']['name']}"


def by_file(name: str, kind: str) -> dict:
    return next(d for n, _, d in DOCS if n == name and d["kind"] == kind)


# ------------------------------------------------------------------------------------------ shapes of resources

def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside a RayService, a RayJob or a RayCluster."""
    key = {"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}.get(doc["kind"])
    return doc["spec"][key] if key else doc["spec"]


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group spec) for the head and each worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    if doc["kind"] in KUBERAY_KINDS:
        found = [(name, g["template"]) for name, g in groups(cluster_spec(doc))]
        if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
            found.append(("submitter", doc["spec"]["submitterPodTemplate"]))
        return found
    if doc["kind"] == "Job":
        return [("job", doc["spec"]["template"])]
    return []


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
FACTORS = {None: 1, "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> Fraction:
    match = QUANTITY.match(str(value))
    assert match, f"unparsable quantity {value!r}"
    return Fraction(match[1]) * FACTORS[match[2]]


def ray_capacity(group: dict) -> dict:
    """What one pod of a group advertises to Ray: the container limits (memory less the 30% object store), or the
    group's `resources` override."""
    limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    cap = {"CPU": quantity(limits.get("cpu", 0)), "GPU": quantity(limits.get("nvidia.com/gpu", 0)),
           "memory": quantity(limits.get("memory", 0)) * Fraction(7, 10)}
    for key, value in (group.get("resources") or {}).items():
        cap[key] = quantity(value)
    return cap


def fits(demand: dict, capacity: dict) -> bool:
    return all(capacity.get(k, 0) >= v for k, v in demand.items() if v)


def selector_matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def replica_demand(deployment: dict) -> tuple[dict, dict, int]:
    """(Ray resources of one replica, its label selector, the most replicas Serve may run)."""
    opts = deployment.get("ray_actor_options") or {}
    demand = {"CPU": Fraction(str(opts.get("num_cpus", 1))), "GPU": Fraction(str(opts.get("num_gpus", 0))),
              "memory": Fraction(str(opts.get("memory", 0)))}
    demand |= {k: Fraction(str(v)) for k, v in (opts.get("resources") or {}).items()}
    num = deployment.get("num_replicas", 1)
    if deployment.get("autoscaling_config"):
        most = deployment["autoscaling_config"].get("max_replicas", 100 if num == "auto" else 1)
    else:
        most = 100 if num == "auto" else num  # "auto": Serve's autoscaling defaults, up to 100 replicas
    return demand, opts.get("label_selector") or {}, int(most)


def capacity_problems(spec: dict, consumers: list[tuple[str, dict, dict, int]]) -> list[str]:
    """Each consumer (name, demand of one replica, label selector, most replicas) fits one pod of a group its
    selector allows, and the consumers confined to some groups fit those groups at maxReplicas, per resource."""
    pods = [(name, ray_capacity(g), g.get("labels") or {}, 1 if name == "head" else g.get("maxReplicas", 1))
            for name, g in groups(spec)]

    def usable(selector: dict) -> set[str]:
        return {name for name, _, labels, _ in pods if selector_matches(selector, labels)}

    problems = []
    for name, demand, selector, _ in consumers:
        if not any(fits(demand, cap) for n, cap, _, _ in pods if n in usable(selector)):
            shapes = {n: {k: str(v) for k, v in cap.items()} for n, cap, _, _ in pods}
            problems.append(f"{name}: one replica needs {dict(demand)} with selector {selector}; no group fits it "
                            f"({shapes})")
    for resource in ("CPU", "GPU"):
        for _, _, selector, _ in consumers:
            allowed = usable(selector)
            need = sum(d.get(resource, 0) * most for _, d, s, most in consumers if usable(s) <= allowed)
            have = sum(cap.get(resource, 0) * most for n, cap, _, most in pods if n in allowed)
            if need > have:
                problems.append(f"{resource}: replicas confined to groups {sorted(allowed)} need {need} at their "
                                f"maximum; those groups offer {have} at maxReplicas")
    return sorted(set(problems))


def serve_consumers(doc: dict) -> list[tuple[str, dict, dict, int]]:
    return [(d["name"], *replica_demand(d)) for app in serve_config(doc)["applications"]
            for d in app.get("deployments", [])]


# ------------------------------------------------------------------------------------ KubeRay CRD (JSON schema)

def strict(schema):
    """Reject unknown fields like the API server's strict field validation: objects with declared properties and
    no additionalProperties / preserve-unknown-fields get additionalProperties: false."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


def crd_errors(validators: dict, doc: dict) -> list[str]:
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    errors = sorted(validators[doc["kind"]].iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors]


@pytest.mark.parametrize("item", KUBERAY_DOCS, ids=doc_id)
def test_kuberay_resource_matches_crd_schema(crd_validators, item):
    _, doc = item
    assert crd_errors(crd_validators, doc) == []


# -------------------------------------------------------------------------------- core objects (kubernetes-validate)

def k8s_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path))}: {exc.message[:300]}"]
    return []


def embedded_objects(doc: dict) -> list[dict]:
    """The parts of a KubeRay resource kubernetes-validate knows: its metadata (as a ConfigMap's) and each pod
    template (as a PodTemplate), so the pod specs are checked against Kubernetes' own schema too."""
    objs = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}]
    objs += [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{doc['metadata']['name']}-{name}"},
              "template": template} for name, template in pod_templates(doc)]
    return objs


@pytest.mark.parametrize("item", CORE_DOCS, ids=doc_id)
def test_core_resource_passes_kubernetes_validate(item):
    assert k8s_errors(item[1]) == []


@pytest.mark.parametrize("item", KUBERAY_DOCS, ids=doc_id)
def test_kuberay_pod_templates_pass_kubernetes_validate(item):
    assert [e for obj in embedded_objects(item[1]) for e in k8s_errors(obj)] == []


# --------------------------------------------------------------- the operator's own checks (no webhook offline)

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def operator_problems(doc: dict) -> list[str]:
    """A port of the KubeRay v1.7 controller's ValidateRay{Cluster,Service,Job}{Metadata,Spec} rules that bite
    manifests (the operator rejects such a resource with an event, after `kubectl apply` succeeded)."""
    problems, name, spec = [], doc["metadata"]["name"], cluster_spec(doc)
    max_len = 53 if doc["kind"] == "RayCluster" else 47
    if not DNS1035.match(name) or len(name) > max_len:
        problems.append(f"name {name!r} must be a DNS-1035 label of at most {max_len} characters")
    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    if len(names) != len(set(names)):
        problems.append(f"worker group names repeat: {names}")
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_env = {e["name"]: e.get("value") for e in head.get("env", [])}
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    v2 = autoscaling and ((spec.get("autoscalerOptions") or {}).get("version") == "v2"
                          or head_env.get("RAY_enable_autoscaler_v2") in ("1", "true"))
    if (spec.get("autoscalerOptions") or {}).get("version") and "RAY_enable_autoscaler_v2" in head_env:
        problems.append("set autoscalerOptions.version or RAY_enable_autoscaler_v2, not both")
    for group_name, group in groups(spec):
        params, labels = group.get("rayStartParams") or {}, group.get("labels") or {}
        if not group["template"]["spec"].get("containers"):
            problems.append(f"{group_name}: no container")
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            problems.append(f"{group_name}: resources set in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{group_name}: rayStartParams['labels'] is not supported; use labels")
        for key, value in labels.items():
            if not LABEL_KEY.match(key) or not LABEL_VALUE.match(str(value)) or len(str(value)) > 63:
                problems.append(f"{group_name}: invalid label {key}={value}")
        if v2 and group["template"]["spec"].get("restartPolicy", "Never") != "Never":
            problems.append(f"{group_name}: restartPolicy must be Never or unset with autoscaler v2")
        if group_name != "head":
            lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            if not lo <= group.get("replicas", lo) <= hi:
                problems.append(f"{group_name}: replicas outside [minReplicas, maxReplicas]")
            if autoscaling and group.get("suspend"):
                problems.append(f"{group_name}: cannot be suspended with autoscaling")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        if version_tuple(spec.get("rayVersion", "0")) < (2, 52, 0):
            problems.append("authOptions.mode token needs rayVersion >= 2.52.0")
    if doc["kind"] == "RayService":
        if (spec["headGroupSpec"].get("headService") or {}).get("metadata", {}).get("name"):
            problems.append("headService.metadata.name must not be set in a RayService")
        upgrade = (doc["spec"].get("upgradeStrategy") or {}).get("type")
        if upgrade not in (None, "NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
            problems.append(f"upgradeStrategy.type {upgrade!r} is not one the operator knows")
    if doc["kind"] == "RayJob":
        job = doc["spec"]
        if job.get("activeDeadlineSeconds") is not None and job["activeDeadlineSeconds"] <= 0:
            problems.append("activeDeadlineSeconds must be positive")
        if job.get("ttlSecondsAfterFinished", 0) > 0 and not job.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if job.get("backoffLimit", 0) < 0:
            problems.append("backoffLimit must not be negative")
    return problems


@pytest.mark.parametrize("item", KUBERAY_DOCS, ids=doc_id)
def test_kuberay_operator_rules(item):
    assert operator_problems(item[1]) == []


# ------------------------------------------------------------------------------------------ embedded Serve config

def serve_schema_errors(doc: dict) -> list[str]:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(serve_config(doc))
    except ValidationError as exc:
        return [str(exc)]
    return []


@pytest.mark.parametrize("item", RAYSERVICES, ids=doc_id)
def test_serve_config_v2_matches_serve_schema(item):
    _, doc = item
    assert serve_schema_errors(doc) == []
    http = serve_config(doc).get("http_options") or {}
    # KubeRay's serve Service targets port 8000 of every pod: the proxy must listen there on all interfaces.
    assert http.get("host", "0.0.0.0") == "0.0.0.0" and http.get("port", 8000) == 8000, http
    ports = {p["name"]: p["containerPort"] for p in
             cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0].get("ports", [])}
    assert ports.get("serve") == 8000, ports


def import_target(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def app_problems(doc: dict) -> list[str]:
    """Each application's import_path imports and builds with its args (what the Serve controller does on the head),
    every deployment the config lists is one the app has, and each request router class imports."""
    from ray.serve._private.build_app import (
        build_app,  # private, but Ray is pinned; it names the deployments
    )

    problems = []
    for app in serve_config(doc)["applications"]:
        try:
            built = build_app(import_target(app["import_path"])(app.get("args") or {}), name=app["name"])
        except Exception as exc:  # an import error, a renamed builder, args the app's pydantic config refuses
            problems.append(f"{app['import_path']}: {type(exc).__name__}: {exc}"[:500])
            continue
        names = {d.name for d in built.deployments}
        for d in app.get("deployments", []):
            if d["name"] not in names:
                problems.append(f"{app['name']}: the config lists deployment {d['name']!r}; "
                                f"the app has {sorted(names)}")
            router = (d.get("request_router_config") or {}).get("request_router_class")
            if isinstance(router, str):
                try:
                    import_target(router)
                except (ImportError, AttributeError) as exc:
                    problems.append(f"{router}: {exc!r}")
    return problems


@pytest.mark.parametrize("item", RAYSERVICES, ids=doc_id)
def test_serve_apps_import_and_build(item):
    assert app_problems(item[1]) == []


def test_every_rayservice_is_rendered_by_render_py():
    assert {t.manifest for t in render.TARGETS} == {f"k8s/{n}" for n, _ in RAYSERVICES}


def configured(target) -> dict:
    """The Serve config file a target renders from."""
    assert (ROOT / target.config).is_file(), f"{target.config} (rendered into {target.manifest}) does not exist"
    return yaml.safe_load((ROOT / target.config).read_text())


@pytest.mark.parametrize("target", render.TARGETS, ids=lambda t: Path(t.manifest).name)
def test_serve_config_v2_is_generated_from_configs(target):
    """One source of truth: the embedded config is the configs/ file plus only the target's Kubernetes changes."""
    source = configured(target)
    text = (ROOT / target.manifest).read_text()
    expected = render.serve_config(target)
    assert yaml.safe_load(yaml.safe_load(text)["spec"]["serveConfigV2"]) == expected, \
        f"{target.manifest} is stale: run python k8s/render.py"
    assert render.render_manifest(text, expected) == text, f"{target.manifest} is stale: run python k8s/render.py"
    assert render.render(text, target) == text, f"{target.manifest}: env is stale: run python k8s/render.py"
    assert without_kubernetes_changes(expected, source) == source


def without_kubernetes_changes(rendered: dict, configured: dict) -> dict:
    """`rendered` with the changes render.py may make put back as `configured` has them: the proxy's placement and
    address, the working_dir, the label selectors. Anything else that differs is a change nobody declared."""
    out = copy.deepcopy(rendered)
    for key in ("proxy_location", "http_options"):
        out.pop(key, None)
        if key in configured:
            out[key] = configured[key]
    for app, source in zip(out["applications"], configured["applications"]):
        if "working_dir" in (source.get("runtime_env") or {}):
            app["runtime_env"]["working_dir"] = source["runtime_env"]["working_dir"]
        sources = {d["name"]: d for d in source.get("deployments", [])}
        for d in app.get("deployments", []):
            opts = d.get("ray_actor_options") or {}
            opts.pop("label_selector", None)
            if not opts and "ray_actor_options" not in sources.get(d["name"], {}):
                d.pop("ray_actor_options", None)
            if "label_selector" in (sources.get(d["name"], {}).get("ray_actor_options") or {}):
                opts["label_selector"] = sources[d["name"]]["ray_actor_options"]["label_selector"]
    return out


@pytest.mark.parametrize("item", RAYSERVICES, ids=doc_id)
def test_serve_replicas_fit_worker_groups(item):
    _, doc = item
    assert capacity_problems(cluster_spec(doc), serve_consumers(doc)) == []


@pytest.mark.parametrize("item", RAYSERVICES, ids=doc_id)
def test_pinned_stages_have_their_worker_group(item):
    _, doc = item
    spec = cluster_spec(doc)
    selectors = [s for _, _, s, _ in serve_consumers(doc) if s]
    group_labels = [g.get("labels") or {} for _, g in groups(spec)]
    for selector in selectors:
        assert any(selector_matches(selector, labels) for labels in group_labels), selector
    # Every labelled group is there for some stage (a typo in either place would strand it).
    for _, group in groups(spec):
        if group.get("labels"):
            assert any(selector_matches(s, group["labels"]) for s in selectors), group["groupName"]


# ------------------------------------------------------------------------------------------------ S3 and secrets

def all_env(doc: dict):
    """(container, env, envFrom) of every container of every pod the resource makes."""
    for _, template in pod_templates(doc):
        for c in containers(template):
            yield c, c.get("env", []), c.get("envFrom", [])


def inline_credential_problems(text: str, doc: dict) -> list[str]:
    """An AWS key or secret written into the file, or a secret-looking env var given a literal value."""
    problems = []
    if re.search(r"AKIA[0-9A-Z]{16}", text):
        problems.append("an AWS access key id is written in the file")
    if re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}", text):
        problems.append("an AWS secret access key is written in the file")
    for c, env, _ in all_env(doc):
        for e in env:
            if re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|API_KEY|CREDENTIAL", e["name"]) and (
                    "value" in e or "secretKeyRef" not in e.get("valueFrom", {})):
                problems.append(f"{c['name']}: {e['name']} must come from a secretKeyRef")
    return problems


@pytest.mark.parametrize("path", MANIFESTS + [ROOT / "Dockerfile", K8S / "README.md"], ids=lambda p: p.name)
def test_no_credentials_inline(path):
    docs = load_docs(path) if path.suffix == ".yaml" else [{"kind": "None"}]
    assert [p for d in docs for p in inline_credential_problems(path.read_text(), d)] == []


def ingress_hosts(doc: dict) -> set[str]:
    """Groups one pod of which fits an Ingress replica, by this file's resource model (not render.py's)."""
    ingress = [c for c in serve_consumers(doc) if render.stage_of(c[0]) == "ingress"]
    return {name for name, group in groups(cluster_spec(doc)) for _, demand, selector, _ in ingress
            if selector_matches(selector, group.get("labels") or {}) and fits(demand, ray_capacity(group))}


def api_key_problems(doc: dict) -> list[str]:
    """Every group that can run the ingress gets each application's api_key_env from the optional Secret
    crosstrim-api-keys (key `keys`); no other group gets the keys."""
    from deployments.config import AppConfig

    names = {(app.get("args") or {}).get("api_key_env", AppConfig().api_key_env)
             for app in serve_config(doc)["applications"]}
    wanted = {n: {"name": "crosstrim-api-keys", "key": "keys", "optional": True} for n in names}
    hosts, problems = ingress_hosts(doc), []
    if not hosts:
        problems.append("no group can run the ingress")
    for name, group in groups(cluster_spec(doc)):
        env = group["template"]["spec"]["containers"][0].get("env", [])
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
        keys = {n: r for n, r in refs.items() if n in names}
        if name in hosts and keys != wanted:
            problems.append(f"{name}: runs the ingress; its API keys come from {keys}, not {wanted}")
        if name not in hosts and keys:
            problems.append(f"{name}: cannot run the ingress but gets the API keys")
    return problems


@pytest.mark.parametrize("item", RAYSERVICES, ids=doc_id)
def test_ingress_pods_get_api_keys_from_a_secret(item):
    assert api_key_problems(item[1]) == []


def s3_reading_groups(doc: dict) -> list[str]:
    """Groups whose pods read S3: every worker for a RayService with an s3:// model, every pod for the RayJob."""
    if doc["kind"] == "RayService":
        apps = serve_config(doc)["applications"]
        if any((app.get("args") or {}).get("model", {}).get("source", "").startswith("s3://") for app in apps):
            return [n for n, _ in groups(cluster_spec(doc)) if n != "head"]
        return []
    if doc["kind"] == "RayJob" and "s3://" in doc["spec"]["entrypoint"]:
        return [n for n, _ in groups(cluster_spec(doc))]
    return []


def s3_credential_problems(doc: dict) -> list[str]:
    problems = []
    for name, group in groups(cluster_spec(doc)):
        if name in s3_reading_groups(doc):
            ray = group["template"]["spec"]["containers"][0]
            refs = [f["secretRef"]["name"] for f in ray.get("envFrom", []) if "secretRef" in f]
            refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in ray.get("env", [])
                     if e["name"] == "AWS_ACCESS_KEY_ID" and "secretKeyRef" in e.get("valueFrom", {})]
            if not refs:
                problems.append(f"{name}: reads S3 but gets no credentials from a Secret")
    return problems


@pytest.mark.parametrize("item", KUBERAY_DOCS, ids=doc_id)
def test_s3_readers_get_credentials_from_a_secret(item):
    assert s3_credential_problems(item[1]) == []


def mounted(path: str, container: dict) -> bool:
    mounts = [m["mountPath"].rstrip("/") for m in container.get("volumeMounts", [])]
    return any(path == m or path.startswith(m + "/") for m in mounts)


@pytest.mark.parametrize("item", RAYSERVICES, ids=doc_id)
def test_model_cache_is_a_volume(item):
    """Pods that mirror the checkpoint from S3 write it to a volume sized for it, not the container's layer."""
    _, doc = item
    caches = {(app.get("args") or {}).get("model", {}).get("cache_dir") or "/home/ray/.cache/crosstrim"
              for app in serve_config(doc)["applications"]}
    for name, group in groups(cluster_spec(doc)):
        if name in s3_reading_groups(doc):
            ray = group["template"]["spec"]["containers"][0]
            assert all(mounted(cache, ray) for cache in caches), (name, caches)


def test_readme_creates_every_referenced_secret():
    readme = (K8S / "README.md").read_text()
    created = set(re.findall(r"kubectl create secret generic ([a-z0-9-]+)", readme))
    referenced = set()
    for _, _, doc in DOCS:
        if doc["kind"] in KUBERAY_KINDS and (cluster_spec(doc).get("authOptions") or {}).get("secretName"):
            referenced.add(cluster_spec(doc)["authOptions"]["secretName"])
        for _, env, env_from in all_env(doc):
            referenced |= {f["secretRef"]["name"] for f in env_from if "secretRef" in f}
            referenced |= {e["valueFrom"]["secretKeyRef"]["name"] for e in env
                           if "secretKeyRef" in e.get("valueFrom", {})}
    assert referenced and referenced <= created, referenced - created


def test_readme_points_at_files_that_exist():
    readme = (K8S / "README.md").read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:k8s|configs|loadtests)/[\w./-]+\.(?:yaml|py))", readme))
    assert paths
    assert [p for p in paths if not (ROOT / p).exists()] == []


def sizing_problems(doc: dict) -> list[str]:
    """Ray containers: requests equal limits (Ray advertises the limits), GPU pods go to GPU nodes, and a memory
    /dev/shm holds Ray's object store (30% of the pod's memory)."""
    problems = []
    for name, group in groups(cluster_spec(doc)):
        pod = group["template"]["spec"]
        ray = pod["containers"][0]
        requests, limits = ray["resources"].get("requests", {}), ray["resources"].get("limits", {})
        for key in ("cpu", "memory"):
            if key not in limits or quantity(requests.get(key, limits[key])) != quantity(limits[key]):
                problems.append(f"{name}: {key} request must equal its limit")
        if "nvidia.com/gpu" in limits:
            tolerated = any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
            if not tolerated or not pod.get("nodeSelector"):
                problems.append(f"{name}: GPU pod without a GPU nodeSelector and toleration")
        shm = [v for v in pod.get("volumes", []) if (v.get("emptyDir") or {}).get("medium") == "Memory"
               and any(m["name"] == v["name"] and m["mountPath"] == "/dev/shm" for m in ray.get("volumeMounts", []))]
        if shm and quantity(shm[0]["emptyDir"]["sizeLimit"]) < Fraction(3, 10) * quantity(limits["memory"]):
            problems.append(f"{name}: /dev/shm smaller than Ray's object store")
    return problems


@pytest.mark.parametrize("item", KUBERAY_DOCS, ids=doc_id)
def test_ray_pods_are_sized(item):
    assert sizing_problems(item[1]) == []

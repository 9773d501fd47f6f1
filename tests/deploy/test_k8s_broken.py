"""The k8s/ validators can fail: broken manifests, Serve configs, operator rules, sizing and capacity, undeclared
changes and a broken render are each detected."""

import copy
import shlex

import pytest
import yaml

from tests.deploy.test_k8s import (
    K8S,
    ROOT,
    api_key_problems,
    app_problems,
    by_file,
    capacity_problems,
    cluster_spec,
    configured,
    crd_errors,
    embedded_objects,
    inline_credential_problems,
    k8s_errors,
    load_docs,
    operator_problems,
    render,
    s3_credential_problems,
    serve_config,
    serve_consumers,
    serve_schema_errors,
    sizing_problems,
    without_kubernetes_changes,
)
from tests.deploy.test_k8s_images_jobs import crosstrim_parser, locust_args, locust_job, parse_locust

# ---------------------------------------------------------------------- the validators can fail (broken manifests)

def broken(doc: dict, edit) -> dict:
    doc = copy.deepcopy(doc)
    edit(doc)
    return doc


GPU = by_file("rayservice-llama-3.2-11b-vision.yaml", "RayService")
WORKERS = lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"]  # noqa: E731


def worker(doc: dict, group: str) -> dict:
    return next(g for g in WORKERS(doc) if g["groupName"] == group)


def test_broken_manifest_file_fails_crd_schema(crd_validators, tmp_path):
    """A manifest file with a typo'd field, a wrong type, a bad enum and a missing required field."""
    text = (K8S / "rayservice-llama-3.2-11b-vision.yaml").read_text()
    text = text.replace("    workerGroupSpecs:", "    workerGroupSpec:", 1)  # typo: unknown field
    text = text.replace("upscalingMode: Default", "upscalingMode: Eager", 1)  # not in the enum
    text = text.replace('rayVersion: "2.60.0"', "rayVersion: 2.60", 1)  # a number, not a string
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    doc = load_docs(path)[0]
    errors = "\n".join(crd_errors(crd_validators, doc))
    assert "workerGroupSpec" in errors and "Eager" in errors and "rayVersion" in errors, errors
    missing = broken(GPU, lambda d: worker(d, "ingress").pop("groupName"))
    assert mentions(crd_errors(crd_validators, missing), "'groupName' is a required property")
    limits = lambda d: worker(d, "ingress")["template"]["spec"]["containers"][0]["resources"]["limits"]  # noqa: E731
    quantity_typo = broken(GPU, lambda d: limits(d).update(memory="32 GB"))
    assert mentions(crd_errors(crd_validators, quantity_typo), "limits.memory")


def test_broken_core_objects_fail_kubernetes_validate():
    job = by_file("locust-job.yaml", "Job")
    assert mentions(k8s_errors(broken(job, lambda d: d["spec"].update(backofLimit=1))), "backofLimit")
    assert mentions(k8s_errors(broken(job, lambda d: d["spec"].update(activeDeadlineSeconds="30m"))), "30m")
    pod = embedded_objects(GPU)[1]
    assert mentions(k8s_errors(broken(pod, lambda d: d["template"]["spec"]["containers"][0].update(imagePullPolicy=3))),
                    "imagePullPolicy")
    meta = embedded_objects(GPU)[0]
    assert mentions(k8s_errors(broken(meta, lambda d: d["metadata"].update(labelz={}))), "labelz")


def edit_serve_config(change) -> dict:
    """The 11B RayService with `change(application)` applied to its embedded Serve config."""
    def edit(d):
        cfg = yaml.safe_load(d["spec"]["serveConfigV2"])
        change(cfg["applications"][0])
        d["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    return broken(GPU, edit)


def test_broken_serve_config_fails_schema_and_build():
    bad_replicas = edit_serve_config(lambda app: app["deployments"][0].update(num_replicas=-1))
    assert mentions(serve_schema_errors(bad_replicas), "num_replicas")
    moved = edit_serve_config(lambda app: app.update(import_path="deployments.no_such_module:build_app"))
    assert mentions(app_problems(moved), "ModuleNotFoundError")
    assert mentions(app_problems(edit_serve_config(lambda app: app["args"].update(shipping="kv"))), "shipping")
    renamed = edit_serve_config(lambda app: app["deployments"][1].update(name="Encoder"))
    assert mentions(app_problems(renamed), "'Encoder'")


def mentions(problems: list[str], phrase: str) -> bool:
    """The check failed for the reason under test (not for some other accident of the edit)."""
    return any(phrase in p for p in problems)


def test_broken_operator_rules_sizing_and_capacity_fail():
    def problems(edit, doc=GPU):
        return operator_problems(broken(doc, edit))
    assert mentions(problems(lambda d: worker(d, "encoder").update(groupName="ingress")), "repeat")
    assert mentions(problems(lambda d: worker(d, "ingress")["template"]["spec"].update(restartPolicy="Always")),
                    "restartPolicy")
    assert mentions(problems(lambda d: d["metadata"].update(name="Crosstrim_11B")), "DNS-1035")
    assert mentions(problems(lambda d: d["spec"]["rayClusterConfig"].update(rayVersion="2.50.0")), "2.52.0")
    assert mentions(problems(lambda d: worker(d, "ingress").update(labels={"crosstrim.io/stage": "in gress"})), "label")
    job = by_file("rayjob-batch.yaml", "RayJob")
    assert mentions(problems(lambda d: d["spec"].update(shutdownAfterJobFinishes=False), job),
                    "ttlSecondsAfterFinished")
    decoder = lambda d: worker(d, "decoder")["template"]["spec"]  # noqa: E731
    small_shm = broken(GPU, lambda d: decoder(d)["volumes"][1]["emptyDir"].update(sizeLimit="1Gi"))
    assert mentions(sizing_problems(small_shm), "/dev/shm")
    assert mentions(sizing_problems(broken(GPU, lambda d: decoder(d).pop("tolerations"))), "toleration")
    # No GPU on the decoder group; too few decoder pods for DecoderPool's max_replicas; the encoder group unlabelled.
    for edit, phrase in [(lambda d: decoder(d)["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
                          "DecoderPool"),
                         (lambda d: worker(d, "decoder").update(maxReplicas=2), "GPU: replicas confined to groups"),
                         (lambda d: worker(d, "encoder").pop("labels"), "VisionEncoder")]:
        doc = broken(GPU, edit)
        assert mentions(capacity_problems(cluster_spec(doc), serve_consumers(doc)), phrase), phrase


def test_undeclared_change_is_detected():
    target = render.TARGETS[0]
    source = configured(target)
    rendered = render.serve_config(target)
    rendered["applications"][0]["args"]["engine"]["max_running"] += 1
    assert without_kubernetes_changes(rendered, source) != source


def test_broken_render_is_detected():
    target = render.TARGETS[0]
    configured(target)
    text = (ROOT / target.manifest).read_text()
    stale = text.replace("label_selector", "label_selektor", 1)
    assert render.render_manifest(stale, render.serve_config(target)) != stale


def test_broken_command_lines_fail_their_parsers():
    job = by_file("rayjob-batch.yaml", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"].replace("--input ", "--inputs "))
    with pytest.raises(SystemExit):
        crosstrim_parser().parse_args(argv[1:])
    _, locust, locustfile = locust_job()
    assert parse_locust(locustfile, [a.replace("--users=", "--userz=") for a in locust_args(locust)]).returncode


def test_broken_credentials_are_caught():
    ray = lambda d: worker(d, "decoder")["template"]["spec"]["containers"][0]  # noqa: E731
    inline = broken(GPU, lambda d: ray(d).setdefault("env", []).append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}))
    assert inline_credential_problems(yaml.safe_dump(inline), inline)
    assert inline_credential_problems("AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", {"kind": "None"})
    literal_keys = broken(GPU, lambda d: worker(d, "ingress")["template"]["spec"]["containers"][0]["env"][0].update(
        value="k1,k2"))
    assert mentions(inline_credential_problems(yaml.safe_dump(literal_keys), literal_keys),
                    "CROSSTRIM_API_KEYS must come from a secretKeyRef")
    no_secret = broken(GPU, lambda d: ray(d).pop("envFrom"))
    assert s3_credential_problems(no_secret) == ["decoder: reads S3 but gets no credentials from a Secret"]


def test_broken_api_key_wiring_is_caught():
    ingress_env = lambda d: worker(d, "ingress")["template"]["spec"]["containers"][0]["env"]  # noqa: E731
    assert mentions(api_key_problems(broken(GPU, lambda d: ingress_env(d).clear())), "ingress: runs the ingress")
    required = broken(GPU, lambda d: ingress_env(d)[0]["valueFrom"]["secretKeyRef"].pop("optional"))
    assert mentions(api_key_problems(required), "ingress: runs the ingress")
    leaked = broken(GPU, lambda d: worker(d, "decoder")["template"]["spec"]["containers"][0].update(
        env=copy.deepcopy(ingress_env(d))))
    assert mentions(api_key_problems(leaked), "decoder: cannot run the ingress")
    # render.py puts a removed block back, and only where the ingress can run.
    target = render.TARGETS[0]
    text = (ROOT / target.manifest).read_text()
    stripped = render.ENV_BLOCK.sub("", text)
    assert stripped != text and render.render(stripped, target) == text
    assert render.ingress_groups(cluster_spec(GPU), serve_config(GPU)) == ["ingress"]

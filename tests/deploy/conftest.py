"""Fixtures for the deploy-layer tests: the KubeRay CRDs' JSON-schema validators (k8s/crds/, in the repository)."""

import jsonschema
import pytest
import yaml

from tests.deploy.test_k8s import CRDS, KUBERAY_KINDS, strict


@pytest.fixture(scope="session")
def crd_validators() -> dict:
    """One Draft7 validator per KubeRay kind from the CRDs in the repository (k8s/crds/): never skipped."""
    validators = {}
    for kind, filename in KUBERAY_KINDS.items():
        crd = yaml.load((CRDS / filename).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["spec"]["names"]["kind"] == kind
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = strict(version["schema"]["openAPIV3Schema"])
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators

"""Every workload of the real-world corpus injects into a Pod spec the API server would accept."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

from tests.conftest import CORPUS
from tests.fixtures.injection.podcheck import KUBERNETES_VERSION, pod_spec_problems, uninjected
from webhook import manifests
from webhook.config import Settings
from webhook.injection.decision import INIT_NAME, PROXY_NAME
from webhook.injection.offline import inject
from webhook.injection.settings import InjectionSettings
from webhook.workloads import as_workload

FILES = [CORPUS / "online-boutique/kubernetes-manifests.yaml", CORPUS / "bookinfo/bookinfo.yaml"]
MODES = {
    "native": InjectionSettings(),
    "classic": InjectionSettings(native_sidecar=False),
    "hold": InjectionSettings(native_sidecar=False, hold_application_until_proxy_starts=True),
}


def corpus_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path.parent.name}/{obj['kind']}/{obj['metadata']['name']}", obj)
            for path in FILES for obj in manifests.load([path])]


OBJECTS = corpus_objects()
WORKLOADS = [(name, obj) for name, obj in OBJECTS if as_workload(obj) is not None]


def test_corpus_has_workloads() -> None:
    assert len(WORKLOADS) == 18


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("obj", [o for _, o in WORKLOADS], ids=[n for n, _ in WORKLOADS])
def test_workload_injects_into_a_valid_pod(obj: dict[str, Any], mode: str) -> None:
    original = copy.deepcopy(obj)
    injected = copy.deepcopy(obj)
    assert inject([injected], Settings(injection=MODES[mode]), "default") == []
    workload = as_workload(injected)
    assert workload is not None
    spec = workload.pod_spec
    assert pod_spec_problems(spec) == []
    names = [c["name"] for c in spec.get("initContainers", []) + spec["containers"]]
    assert names.count(PROXY_NAME) == 1 and names.count(INIT_NAME) == 1
    template_before = as_workload(original).template  # type: ignore[union-attr]
    assert uninjected(workload.template, template_before) == template_before
    # The controller as a whole and the Pod it would create both pass the API's OpenAPI schema, strictly.
    kubernetes_validate.validate(injected, KUBERNETES_VERSION, strict=True)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**workload.template.get("metadata", {}), "name": "p"},
           "spec": spec}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_other_objects_pass_through_untouched() -> None:
    objects = [copy.deepcopy(o) for _, o in OBJECTS]
    inject(objects, Settings(), "default")
    for (name, before), after in zip(OBJECTS, objects, strict=True):
        if as_workload(before) is None:
            assert after == before, name
        else:
            assert after != before, name


def test_the_validator_catches_what_it_should() -> None:
    """Guard against a validator that accepts anything: a misspelt field fails strict validation."""
    workload = copy.deepcopy(WORKLOADS[0][1])
    inject([workload], Settings(), "default")
    workload["spec"]["template"]["spec"]["initContainers"][1]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(workload, KUBERNETES_VERSION, strict=True)

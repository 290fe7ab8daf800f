"""The injection decision: every skip rule, its stable reason code and its sentence."""

from __future__ import annotations

import re
from typing import Any

import pytest

from webhook.injection.decision import MESSAGES, PROXY_NAME, STATUS_ANNOTATION, decide, selected_for_mesh
from webhook.injection.settings import InjectionSettings
from webhook.workloads import Workload

SETTINGS = InjectionSettings(exclude_namespaces=("legacy",))


def template(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
             **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if labels is not None:
        meta["labels"] = labels
    if annotations is not None:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": {"containers": [{"name": "app", "image": "a"}], **spec}}


OPT = "meshguard.io/inject"
CASES = [
    ("plain pod", template(), "shop", True, "inject"),
    ("label opts out", template(labels={OPT: "false"}), "shop", False, "opt-out-label"),
    ("annotation opts out", template(annotations={OPT: "false"}), "shop", False, "opt-out-annotation"),
    ("annotation value is case-insensitive", template(annotations={OPT: " False"}), "shop", False,
     "opt-out-annotation"),
    ("label true wins over annotation false", template(labels={OPT: "true"}, annotations={OPT: "false"}), "shop",
     True, "inject"),
    ("label false wins over annotation true", template(labels={OPT: "false"}, annotations={OPT: "true"}), "shop",
     False, "opt-out-label"),
    ("annotation true is not an opt-out", template(annotations={OPT: "true"}), "shop", True, "inject"),
    ("host network", template(hostNetwork=True), "shop", False, "host-network"),
    ("hostNetwork false", template(hostNetwork=False), "shop", True, "inject"),
    ("kube-system", template(), "kube-system", False, "system-namespace"),
    ("kube-public", template(), "kube-public", False, "system-namespace"),
    ("kube-node-lease", template(), "kube-node-lease", False, "system-namespace"),
    ("own namespace", template(), "mesh-system", False, "own-namespace"),
    ("configured exclusion", template(), "legacy", False, "excluded-namespace"),
    ("status annotation", template(annotations={STATUS_ANNOTATION: "{}"}), "shop", False, "already-injected"),
    ("native proxy present", template(initContainers=[{"name": PROXY_NAME, "image": "e"}]), "shop", False,
     "already-injected"),
    ("classic proxy present", template(containers=[{"name": "app"}, {"name": PROXY_NAME}]), "shop", False,
     "already-injected"),
    ("already injected wins over everything", template(labels={OPT: "false"}, annotations={STATUS_ANNOTATION: "{}"},
                                                       hostNetwork=True), "kube-system", False, "already-injected"),
    ("garbage metadata and spec", {"metadata": "x", "spec": None}, "shop", True, "inject"),
    ("istio sidecar", template(containers=[{"name": "app"}, {"name": "istio-proxy"}]), "shop", False, "other-mesh"),
    ("istio-init", template(initContainers=[{"name": "istio-init"}]), "shop", False, "other-mesh"),
    ("linkerd native sidecar", template(initContainers=[{"name": "linkerd-proxy"}]), "shop", False, "other-mesh"),
    ("istio status annotation", template(annotations={"sidecar.istio.io/status": "{}"}), "shop", False, "other-mesh"),
    ("linkerd annotation", template(annotations={"linkerd.io/proxy-version": "edge"}), "shop", False, "other-mesh"),
    ("a container merely named like a mesh", template(containers=[{"name": "istio"}]), "shop", True, "inject"),
]


@pytest.mark.parametrize(("pod", "namespace", "inject", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(pod: dict[str, Any], namespace: str, inject: bool, reason: str) -> None:
    decision = decide(Workload("Pod", namespace, "", pod, pod, ""), SETTINGS, "mesh-system")
    assert (decision.inject, decision.reason) == (inject, reason)
    assert decision.message == MESSAGES[reason] and decision.message


def test_reasons_are_kebab_case_codes_with_one_line_sentences() -> None:
    for reason, message in MESSAGES.items():
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", reason)
        assert message and "\n" not in message and not message.endswith(".")


@pytest.mark.parametrize(("namespace_labels", "pod_labels", "selected"), [
    ({OPT: "enabled"}, {}, True),
    ({OPT: "enabled"}, {OPT: "false"}, True),
    ({}, {OPT: "true"}, True),
    ({OPT: "disabled"}, {OPT: "true"}, True),
    ({}, {}, False),
    ({OPT: "true"}, {}, False),
    ({}, {OPT: "enabled"}, False),
])
def test_selected_for_mesh(namespace_labels: dict[str, str], pod_labels: dict[str, str], selected: bool) -> None:
    assert selected_for_mesh(namespace_labels, pod_labels) is selected

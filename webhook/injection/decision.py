"""Should this pod get the mesh data plane? A pure decision with a stable reason code.

The MutatingWebhookConfiguration already narrows what reaches the server (see :func:`selected_for_mesh`); the
server decides again here because selectors cannot express opt-outs by annotation, host networking, or "already
injected". Reason codes are stable: they are metric labels, log fields and what the policy engine reports; the
human sentence for each is :attr:`Decision.message`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..workloads import annotations_of, labels_of
from .settings import InjectionSettings

INJECT_KEY = "meshguard.io/inject"
STATUS_ANNOTATION = "meshguard.io/status"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
PROXY_NAME = "meshguard-proxy"
INIT_NAME = "meshguard-init"
BOOTSTRAP_NAME = "meshguard-bootstrap"
NAMESPACE_ENABLED = "enabled"
POD_ENABLED = "true"
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})

MESSAGES: Mapping[str, str] = {
    "inject": "the pod gets the meshguard proxy",
    "already-injected": "the pod already has the meshguard proxy",
    "opt-out-label": f"the pod opted out with the label {INJECT_KEY}=false",
    "opt-out-annotation": f"the pod opted out with the annotation {INJECT_KEY}: \"false\"",
    "host-network": "the pod uses hostNetwork, and redirecting the node's traffic through a proxy is never safe",
    "system-namespace": "pods in Kubernetes system namespaces are never injected",
    "own-namespace": "pods in meshguard's own namespace are never injected",
    "excluded-namespace": "the namespace is listed in injection.exclude_namespaces",
}


@dataclass(frozen=True, slots=True)
class Decision:
    inject: bool
    reason: str

    @property
    def message(self) -> str:
        return MESSAGES[self.reason]


def _opts_out(value: str | None) -> bool:
    return value is not None and value.strip().lower() == "false"


def has_proxy(pod: Mapping[str, Any]) -> bool:
    """The status annotation or a container named ``meshguard-proxy`` (native or classic) is present."""
    if STATUS_ANNOTATION in annotations_of(pod):
        return True
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return False
    for key in ("initContainers", "containers"):
        containers = spec.get(key)
        if isinstance(containers, list) and any(
            isinstance(c, dict) and c.get("name") == PROXY_NAME for c in containers
        ):
            return True
    return False


def decide(pod: Mapping[str, Any], namespace: str, settings: InjectionSettings, own_namespace: str) -> Decision:
    """Decide for a Pod or a PodTemplateSpec (``{metadata, spec}``) that lives in ``namespace``.

    "Already injected" comes first because it is a fact about the pod, not a choice: whatever else applies, the
    proxy is there. The pod label wins over the annotation, as the issue's users expect from Istio.
    """
    if has_proxy(pod):
        return Decision(False, "already-injected")
    if namespace in SYSTEM_NAMESPACES:
        return Decision(False, "system-namespace")
    if namespace == own_namespace:
        return Decision(False, "own-namespace")
    if namespace in settings.exclude_namespaces:
        return Decision(False, "excluded-namespace")
    label = labels_of(pod).get(INJECT_KEY)
    if _opts_out(label):
        return Decision(False, "opt-out-label")
    if label is None and _opts_out(annotations_of(pod).get(INJECT_KEY)):
        return Decision(False, "opt-out-annotation")
    spec = pod.get("spec")
    if isinstance(spec, dict) and spec.get("hostNetwork") is True:
        return Decision(False, "host-network")
    return Decision(True, "inject")


def selected_for_mesh(namespace_labels: Mapping[str, str], pod_labels: Mapping[str, str]) -> bool:
    """Whether either webhook entry sends this pod to meshguard: namespace ``meshguard.io/inject=enabled``, or
    pod ``meshguard.io/inject=true`` (the entry for pods in unlabeled namespaces)."""
    return namespace_labels.get(INJECT_KEY) == NAMESPACE_ENABLED or pod_labels.get(INJECT_KEY) == POD_ENABLED

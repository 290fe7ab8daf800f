"""Should this pod get the mesh data plane? A pure decision with a stable reason code.

The MutatingWebhookConfiguration already narrows what reaches the server (see :func:`selected_for_mesh`); the
server decides again here because selectors cannot express opt-outs by annotation, host networking, or "already
injected". Reason codes are stable: they are metric labels, log fields and what the policy engine reports; the
human sentence for each is :attr:`Decision.message`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..namespaces import SYSTEM_NAMESPACES
from ..workloads import Workload
from .settings import InjectionSettings

INJECT_KEY = "meshguard.io/inject"
STATUS_ANNOTATION = "meshguard.io/status"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
PROXY_NAME = "meshguard-proxy"
INIT_NAME = "meshguard-init"
NAMESPACE_ENABLED = "enabled"
POD_ENABLED = "true"

MESSAGES: Mapping[str, str] = {
    "inject": "the pod gets the meshguard proxy",
    "already-injected": "the pod already has the meshguard proxy",
    "opt-out-label": f"the pod opted out with the label {INJECT_KEY}=false",
    "opt-out-annotation": f"the pod opted out with the annotation {INJECT_KEY}: \"false\"",
    "host-network": "the pod uses hostNetwork, and redirecting the node's traffic through a proxy is never safe",
    "system-namespace": "pods in Kubernetes system namespaces are never injected",
    "own-namespace": "pods in meshguard's own namespace are never injected",
    "excluded-namespace": "the namespace is listed in injection.exclude_namespaces",
    "other-mesh": "the pod already carries another mesh's sidecar (Istio or Linkerd), and two proxies cannot both "
                  "capture its traffic",
}
# What another mesh's injector leaves in a pod: its containers, and its status annotations.
OTHER_MESH_CONTAINERS = frozenset({"istio-proxy", "istio-init", "istio-validation", "linkerd-proxy", "linkerd-init"})
OTHER_MESH_ANNOTATIONS = ("sidecar.istio.io/status", "linkerd.io/proxy-version")


@dataclass(frozen=True, slots=True)
class Decision:
    inject: bool
    reason: str

    @property
    def message(self) -> str:
        return MESSAGES[self.reason]


def _opts_out(value: str | None) -> bool:
    return value is not None and value.strip().lower() == "false"


def _container_names(template: Mapping[str, Any]) -> Iterator[Any]:
    spec = template.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    for key in ("containers", "initContainers"):
        items = spec.get(key)
        yield from (c.get("name") for c in (items if isinstance(items, list) else ()) if isinstance(c, dict))


def proxy_container_present(template: Mapping[str, Any]) -> bool:
    """A ``meshguard-proxy`` container or init container (native or classic sidecar) is in the pod spec."""
    return PROXY_NAME in _container_names(template)


def _in_other_mesh(workload: Workload) -> bool:
    return (any(isinstance(name, str) and name in OTHER_MESH_CONTAINERS for name in _container_names(workload.template))
            or any(key in workload.annotations for key in OTHER_MESH_ANNOTATIONS))


def decide(workload: Workload, settings: InjectionSettings, own_namespace: str) -> Decision:
    """Decide for a Pod or pod controller, through its pod template and its namespace.

    "Already injected" (the status annotation or the proxy container) comes first because it is a fact about the
    pod, not a choice: whatever else applies, the proxy is there. The pod label wins over the annotation, as the
    issue's users expect from Istio.
    """
    pod, namespace = workload.template, workload.namespace
    if STATUS_ANNOTATION in workload.annotations or proxy_container_present(pod):
        return Decision(False, "already-injected")
    if _in_other_mesh(workload):
        return Decision(False, "other-mesh")
    if namespace in SYSTEM_NAMESPACES:
        return Decision(False, "system-namespace")
    if namespace == own_namespace:
        return Decision(False, "own-namespace")
    if namespace in settings.exclude_namespaces:
        return Decision(False, "excluded-namespace")
    label = workload.labels.get(INJECT_KEY)
    if _opts_out(label):
        return Decision(False, "opt-out-label")
    if label is None and _opts_out(workload.annotations.get(INJECT_KEY)):
        return Decision(False, "opt-out-annotation")
    spec = pod.get("spec")
    if isinstance(spec, dict) and spec.get("hostNetwork") is True:
        return Decision(False, "host-network")
    return Decision(True, "inject")


def selected_for_mesh(namespace_labels: Mapping[str, str], pod_labels: Mapping[str, str]) -> bool:
    """Whether either webhook entry sends this pod to meshguard: namespace ``meshguard.io/inject=enabled``, or
    pod ``meshguard.io/inject=true`` (the entry for pods in unlabeled namespaces)."""
    return namespace_labels.get(INJECT_KEY) == NAMESPACE_ENABLED or pod_labels.get(INJECT_KEY) == POD_ENABLED

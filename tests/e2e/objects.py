"""Small builders and readers of the objects the end-to-end tests send and get back (plain JSON dicts).

Names are spelled out as the README documents them, not imported from the package: these tests check the
contract users see.
"""

from __future__ import annotations

from typing import Any

from tests.e2e.cluster import EXEMPT_LABEL, ControlPlane

MESH = {"meshguard.io/inject": "enabled"}
EXEMPT = {EXEMPT_LABEL: "true"}
INIT = "meshguard-init"
PROXY = "meshguard-proxy"
STATUS = "meshguard.io/status"
IMAGE = "registry.example/app:1"  # never pulled: no kubelet runs, admission is all that happens


def pod(name: str, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
        **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {"app": name}, "annotations": annotations or {}},
            "spec": {"containers": [{"name": "app", "image": IMAGE}], **spec}}


def deployment(name: str, labels: dict[str, str] | None = None, replicas: int = 1,
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A Deployment whose pods carry ``labels`` (default ``app=<name>``) and ``annotations``."""
    labels = labels or {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels, "annotations": annotations or {}},
                                  "spec": {"containers": [{"name": "app", "image": IMAGE}]}}}}


def network_policy(name: str = "default-deny", selector: dict[str, str] | None = None) -> dict[str, Any]:
    """An Ingress-isolating NetworkPolicy selecting pods with ``selector`` (every pod by default)."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name},
            "spec": {"podSelector": {"matchLabels": selector} if selector else {}, "policyTypes": ["Ingress"]}}


def _spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"] if "template" in obj["spec"] else obj["spec"]


def init_names(obj: dict[str, Any]) -> list[str]:
    return [c["name"] for c in _spec(obj).get("initContainers") or []]


def container_names(obj: dict[str, Any]) -> list[str]:
    return [c["name"] for c in _spec(obj).get("containers") or []]


def injected(obj: dict[str, Any]) -> bool:
    return PROXY in init_names(obj) + container_names(obj)


def webhooks_answering(cluster: ControlPlane, mesh: str, plain: str) -> tuple[bool, bool]:
    """Whether the API server calls meshguard's (injection, validation) webhooks, probed with server-side dry
    runs that store nothing: a pod in ``mesh`` (labeled for injection, exempt from policy) comes back injected;
    a Deployment in ``plain`` (no label, no NetworkPolicy) is denied. The API server loads webhook
    configurations asynchronously, so after a change this is what to poll."""
    injecting = injected(cluster.dry_run(pod("probe"), mesh))
    refused = cluster.apply([deployment("probe")], "--dry-run=server", "-n", plain, check=False)
    return injecting, "denied the request" in refused.stderr


# Istio's PeerAuthentication CRD, reduced to what meshguard reads (the API server stores any spec).
PEER_AUTHENTICATION_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "peerauthentications.security.istio.io"},
    "spec": {
        "group": "security.istio.io", "scope": "Namespaced",
        "names": {"kind": "PeerAuthentication", "listKind": "PeerAuthenticationList", "plural": "peerauthentications",
                  "singular": "peerauthentication", "shortNames": ["pa"]},
        "versions": [{"name": version, "served": True, "storage": version == "v1", "schema": {"openAPIV3Schema": {
            "type": "object",
            "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}}
            for version in ("v1", "v1beta1")],
    },
}


def peer_authentication(name: str, mode: str, selector: dict[str, str] | None = None,
                        version: str = "v1") -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    return {"apiVersion": f"security.istio.io/{version}", "kind": "PeerAuthentication", "metadata": {"name": name},
            "spec": spec}

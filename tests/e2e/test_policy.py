"""Policy enforcement as kubectl users see it: one readable line per failed rule, warn mode, same-apply ordering,
dry runs, updates, and PeerAuthentications read from a real CRD."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import yaml

from tests.conftest import CORPUS
from tests.e2e.cluster import ControlPlane, Meshguard, wait_for
from tests.e2e.objects import MESH, PEER_AUTHENTICATION_CRD, deployment, network_policy, peer_authentication

BOUTIQUE = CORPUS / "online-boutique" / "kubernetes-manifests.yaml"
DENIED = re.compile(r'admission webhook "workloads\.validate\.meshguard\.io" denied the request: (.*)')


def denials(stderr: str) -> list[str]:
    """The denial message of every failed object in kubectl's output (messages may span lines: one per rule)."""
    found: list[str] = []
    for line in stderr.splitlines():
        match = DENIED.search(line)
        if match:
            found.append(match.group(1))
        elif found and not line.startswith(("Error from server", "Warning:")):
            found[-1] += "\n" + line
    return found


def boutique_deployments() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(BOUTIQUE.read_text()) if d and d["kind"] == "Deployment"]


def test_deployments_without_network_policies_are_denied_one_line_each_and_warn_mode_admits_them(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace(MESH)
    names = sorted(d["metadata"]["name"] for d in boutique_deployments())
    refused = cluster.kubectl("apply", "-n", ns, "-f", str(BOUTIQUE), check=False)
    assert refused.returncode != 0
    messages = sorted(denials(refused.stderr))
    assert len(messages) == len(names), refused.stderr
    for name, message in zip(names, messages, strict=True):
        labels = "{app=" + name + "}"
        assert message == (
            f"Deployment {ns}/{name}: no NetworkPolicy selects pods with labels {labels} for Ingress; create one "
            "(a default-deny with podSelector {} is enough); if that NetworkPolicy is in this same apply, apply it "
            "first or run the apply again")
    assert cluster.kubectl_json("get", "deployments", "-n", ns)["items"] == []
    assert "serviceaccount/frontend created" in refused.stdout  # everything else in the file went in

    cluster.kubectl("label", "namespace", ns, "meshguard.io/policy=warn")
    admitted = cluster.kubectl("apply", "-n", ns, "-f", str(BOUTIQUE))
    warnings = sorted(line for line in admitted.stderr.splitlines() if line.startswith("Warning: "))
    assert len(warnings) == len(names), admitted.stderr
    for name, warning in zip(names, warnings, strict=True):
        # Under the 120 characters the API recommends for a warning: a long name is cut, never the fix.
        short = "no NetworkPolicy selects it for Ingress; add one (podSelector {})"
        full = f"Deployment {ns}/{name}: {short}"
        shown = warning.removeprefix("Warning: ")
        head, cut, _ = shown.partition("…: ")
        assert shown == full or (len(shown) <= 120 and cut and full.startswith(head)
                                 and shown.endswith(short)), warning
    assert len(cluster.kubectl_json("get", "deployments", "-n", ns)["items"]) == len(names)
    # Both the denials and the warnings are on the Deployments as Events, for kubectl describe (their ReplicaSets
    # and pods, warned on in turn, get theirs).
    def events() -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for event in cluster.kubectl_json("get", "events.events.k8s.io", "-n", ns)["items"]:
            regarding = event["regarding"]
            if event.get("reportingController") == "meshguard.io/meshguard" and regarding["kind"] == "Deployment":
                found.setdefault(event["reason"], set()).add(regarding["name"])
        return found

    seen = wait_for("meshguard's events", lambda: (e := events()) and len(e.get("PolicyWarning", ())) == len(names)
                    and e)
    assert seen == {"PolicyDenied": set(names), "PolicyWarning": set(names)}


def test_a_workload_outside_the_mesh_fails_the_mtls_rule(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace()
    cluster.apply([network_policy()], "-n", ns)
    refused = cluster.apply([deployment("web")], "-n", ns, check=False)
    assert denials(refused.stderr) == [
        f"Deployment {ns}/web: its pods will run without the meshguard sidecar (namespace {ns} is not labeled "
        f"meshguard.io/inject=enabled), so they have no mutual TLS; label namespace {ns} meshguard.io/inject=enabled"]


def test_an_opted_out_pod_in_the_mesh_is_denied_naming_the_opt_out(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace(MESH)
    cluster.apply([network_policy()], "-n", ns)
    refused = cluster.apply([deployment("web", labels={"app": "web", "meshguard.io/inject": "false"})], "-n", ns,
                            check=False)
    (message,) = denials(refused.stderr)
    assert message.startswith(f"Deployment {ns}/web: its pods will run without the meshguard sidecar (the pod "
                              "opted out with the label meshguard.io/inject=false)"), message
    assert message.endswith("remove the meshguard.io/inject label")


def test_policy_and_deployment_in_one_apply_policy_first(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace(MESH)
    # One file, one kubectl apply: the NetworkPolicy is created an instant before the Deployment, possibly before
    # meshguard's watch has delivered it; the live re-check before any denial sees it.
    applied = cluster.apply([network_policy("web", {"app": "web"}), deployment("web")], "-n", ns)
    assert applied.stdout.splitlines() == ["networkpolicy.networking.k8s.io/web created",
                                           "deployment.apps/web created"]
    assert "Warning" not in applied.stderr


def test_server_side_dry_run_is_checked_too(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace(MESH)
    refused = cluster.apply([deployment("web")], "--dry-run=server", "-n", ns, check=False)
    assert len(denials(refused.stderr)) == 1 and "no NetworkPolicy selects pods" in refused.stderr
    cluster.apply([network_policy()], "-n", ns)
    assert "deployment.apps/web created (server dry run)" in cluster.apply(
        [deployment("web")], "--dry-run=server", "-n", ns).stdout
    assert cluster.kubectl_json("get", "deployments", "-n", ns)["items"] == []


def test_updates_that_change_the_pods_are_checked_and_a_replica_change_only_warned(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace(MESH)
    cluster.apply([network_policy(), deployment("web")], "-n", ns)
    cluster.kubectl("delete", "networkpolicy", "default-deny", "-n", ns)
    # Denied once meshguard has seen the deletion (until then its store says covered, and it allows).
    refused = wait_for("the update denied", lambda: (r := cluster.kubectl(
        "set", "image", "deployment/web", "app=registry.example/app:2", "-n", ns, check=False)).returncode and r)
    (message,) = denials(refused.stderr)
    assert message.startswith(f"Deployment {ns}/web: no NetworkPolicy selects pods with labels {{app=web}}")
    # A replica change leaves the pods as they are: admitted, with the failure as a warning.
    scaled = cluster.kubectl("patch", "deployment", "web", "-n", ns, "-p", '{"spec": {"replicas": 2}}')
    assert f"Warning: Deployment {ns}/web: no NetworkPolicy selects it for Ingress" in scaled.stderr


def test_peer_authentications_from_the_istio_crd_decide_the_mtls_rule(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace(MESH)
    cluster.apply([network_policy()], "-n", ns)

    def verdict() -> list[str]:
        return denials(cluster.apply([deployment("web")], "--dry-run=server", "-n", ns, check=False).stderr)

    # meshguard was started without the CRD; it looks for it again every policy.state.crd_poll_seconds.
    cluster.apply([PEER_AUTHENTICATION_CRD])
    cluster.kubectl("wait", "--for=condition=Established", "crd/peerauthentications.security.istio.io")
    try:
        cluster.apply([peer_authentication("default", "PERMISSIVE")], "-n", ns)
        assert wait_for("a denial for PERMISSIVE", verdict) == [
            f"Deployment {ns}/web: mutual TLS mode is PERMISSIVE (PeerAuthentication {ns}/default), so plaintext "
            "is accepted; set its spec.mtls.mode to STRICT"]

        # STRICT: admitted at once, whether or not the watch has delivered the change (a denial re-checks).
        cluster.apply([peer_authentication("default", "STRICT")], "-n", ns)
        assert verdict() == []

        # A workload-level policy, written as v1beta1 (the API serves both versions of the same objects).
        cluster.apply([peer_authentication("web", "PERMISSIVE", {"app": "web"}, "v1beta1")], "-n", ns)
        (message,) = wait_for("a denial for the workload policy", verdict)
        assert message.startswith(f"Deployment {ns}/web: mutual TLS mode is PERMISSIVE (PeerAuthentication {ns}/web")
        assert cluster.apply([deployment("api")], "-n", ns).returncode == 0  # not selected by it
    finally:
        cluster.kubectl("delete", "crd", "peerauthentications.security.istio.io", "--wait=true")
    # Istio uninstalled: no PeerAuthentication applies any more, the default mode (STRICT) does.
    wait_for("admission without the CRD", lambda: verdict() == [])

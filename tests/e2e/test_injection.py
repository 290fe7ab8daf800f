"""Sidecar injection as the API server drives it: controller-made pods, opt-outs, re-applies, dry runs, updates."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import yaml

from tests.conftest import CORPUS
from tests.e2e.cluster import ControlPlane, Meshguard, wait_for
from tests.e2e.objects import (
    EXEMPT,
    INIT,
    MESH,
    PROXY,
    STATUS,
    container_names,
    deployment,
    init_names,
    injected,
    network_policy,
    pod,
)

BOUTIQUE = CORPUS / "online-boutique"
# Set by the API server or by the controllers on the way in; stripped to send a stored pod again as new.
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation", "ownerReferences")


def pods(cluster: ControlPlane, namespace: str, *selector: str) -> list[dict[str, Any]]:
    return cluster.kubectl_json("get", "pods", "-n", namespace, *selector)["items"]


def wait_pods(cluster: ControlPlane, namespace: str, count: int, *selector: str) -> list[dict[str, Any]]:
    return wait_for(f"{count} pods in {namespace}",
                    lambda: (found := pods(cluster, namespace, *selector)) and len(found) >= count and found,
                    timeout=120)


def test_online_boutique_deployments_are_admitted_and_their_pods_injected(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace(MESH)
    cluster.kubectl("apply", "-n", ns, "-f", str(BOUTIQUE / "network-policies"))
    manifests = [d for d in yaml.safe_load_all((BOUTIQUE / "kubernetes-manifests.yaml").read_text()) if d]
    names = sorted(d["metadata"]["name"] for d in manifests if d["kind"] == "Deployment")
    applied = cluster.kubectl("apply", "-n", ns, "-f", str(BOUTIQUE / "kubernetes-manifests.yaml"))
    assert [f"deployment.apps/{n} created" for n in names] == sorted(
        line for line in applied.stdout.splitlines() if line.startswith("deployment.apps/"))
    assert "Warning" not in applied.stderr

    # The ReplicaSet controller creates the pods with generateName only: the webhook gets no pod name.
    stored = wait_pods(cluster, ns, len(names))
    # What `kubectl get pod -o json` shows, for every pod of every Deployment.
    by_app = {p["metadata"]["labels"]["app"]: p for p in stored}
    assert sorted(by_app) == names
    for app, p in by_app.items():
        meta = p["metadata"]
        assert meta["generateName"] and meta["name"].startswith(meta["generateName"])
        assert meta["ownerReferences"][0]["kind"] == "ReplicaSet"
        inits = p["spec"]["initContainers"]
        assert [c["name"] for c in inits[:2]] == [INIT, PROXY], app
        assert inits[1]["restartPolicy"] == "Always"  # the native sidecar
        assert PROXY not in container_names(p)
        status = json.loads(meta["annotations"][STATUS])
        assert status["initContainers"] == [INIT, PROXY] and "meshguard-certs" in status["volumes"], status
        assert meta["annotations"]["kubectl.kubernetes.io/default-container"] == p["spec"]["containers"][0]["name"]
    # The app's own init container is kept, after the redirect and the proxy.
    assert init_names(by_app["loadgenerator"])[2:] == ["frontend-check"]


def test_namespace_without_the_label_gets_no_sidecar(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace(EXEMPT)  # exempt from policy in meshguard's config, so the Deployment is admitted
    cluster.apply([deployment("web")], "-n", ns)
    (stored,) = wait_pods(cluster, ns, 1)
    assert not injected(stored) and STATUS not in (stored["metadata"].get("annotations") or {})
    assert init_names(stored) == [] and container_names(stored) == ["app"]


def test_opt_outs_and_host_network_are_not_injected(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace({**MESH, **EXEMPT})
    cluster.apply([
        pod("by-label", labels={"app": "by-label", "meshguard.io/inject": "false"}),  # the webhook is not called
        pod("by-annotation", annotations={"meshguard.io/inject": "false"}),  # called; meshguard skips it
        pod("host", hostNetwork=True),
        pod("meshed"),
    ], "-n", ns)
    stored = {p["metadata"]["name"]: p for p in pods(cluster, ns)}
    assert {name: injected(p) for name, p in stored.items()} == {
        "by-label": False, "by-annotation": False, "host": False, "meshed": True}


def test_an_injected_pod_sent_again_is_left_as_it_is(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace({**MESH, **EXEMPT})
    manifest = [pod("web")]
    cluster.apply(manifest, "-n", ns)
    first = cluster.kubectl_json("get", "pod", "web", "-n", ns)
    # The same manifest again: nothing to change.
    again = cluster.apply(manifest, "-n", ns)
    assert again.stdout.strip() == "pod/web unchanged"
    # The stored, injected pod created as a new one (e.g. a backup restored): no second sidecar.
    copy = json.loads(json.dumps(first))
    for key in SERVER_FIELDS:
        copy["metadata"].pop(key, None)
    copy["metadata"]["name"] = "web-copy"
    copy.pop("status", None)
    cluster.apply([copy], "-n", ns)
    second = cluster.kubectl_json("get", "pod", "web-copy", "-n", ns)
    assert init_names(second) == init_names(first) == [INIT, PROXY]
    assert second["spec"]["volumes"] == first["spec"]["volumes"]
    assert second["metadata"]["annotations"][STATUS] == first["metadata"]["annotations"][STATUS]


def test_server_side_dry_run_is_injected_and_stores_nothing(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace(MESH)
    cluster.apply([network_policy()], "-n", ns)
    shown = json.loads(cluster.apply([pod("web")], "--dry-run=server", "-n", ns, "-o", "json").stdout)
    assert init_names(shown) == [INIT, PROXY]
    assert "NotFound" in cluster.kubectl("get", "pod", "web", "-n", ns, check=False).stderr


def test_updating_a_deployment_rolls_out_injected_pods(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace(MESH)
    cluster.apply([network_policy(), deployment("web")], "-n", ns)
    wait_pods(cluster, ns, 1)
    cluster.kubectl("set", "image", "deployment/web", "app=registry.example/app:2", "-n", ns)
    cluster.kubectl("label", "deployment", "web", "team=shop", "-n", ns)
    rolled = wait_for("a pod of the new image", lambda: [
        p for p in pods(cluster, ns) if p["spec"]["containers"][0]["image"].endswith(":2")], timeout=120)
    assert init_names(rolled[0]) == [INIT, PROXY]

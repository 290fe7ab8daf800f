"""Faults with the real API server: meshguard down (with either injection failure policy), the API server restarted
under it, and its serving certificate rotated while pods are being created.

Each test leaves meshguard and the API server running, whatever happens, so the rest of the suite is unaffected.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509

from bench.e2e_throughput import Batch, create_pods
from tests.conftest import ROOT, free_port
from tests.e2e.cluster import RELEASE, RELEASE_NAMESPACE, ControlPlane, Meshguard, wait_for
from tests.e2e.objects import EXEMPT, MESH, deployment, injected, network_policy, pod
from webhook import certs

INJECTION_REFUSED = 'failed calling webhook "namespace.inject.meshguard.io"'


@pytest.fixture(autouse=True)
def running_again(cluster: ControlPlane, meshguard: Meshguard) -> Iterator[None]:
    yield
    if not cluster.components["kube-apiserver"].alive():
        cluster.start_apiserver()
    if not meshguard.alive():
        meshguard.start()


def pods(cluster: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    return cluster.kubectl_json("get", "pods", "-n", namespace)["items"]


def test_injector_down_refuses_mesh_pods_and_controllers_recover_on_their_own(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    mesh, elsewhere = make_namespace(MESH), make_namespace(EXEMPT)
    cluster.apply([network_policy()], "-n", mesh)
    meshguard.stop()
    try:
        # Injection fails closed (the chart's default failurePolicy: Fail): no pod of the mesh without its sidecar.
        refused = cluster.apply([pod("web")], "-n", mesh, check=False)
        assert refused.returncode != 0 and INJECTION_REFUSED in refused.stderr
        # Validation fails open (Ignore): the rest of the cluster keeps working, mesh Deployments included...
        cluster.apply([pod("web")], "-n", elsewhere)
        cluster.apply([deployment("api")], "-n", mesh)
        # ... but their ReplicaSets cannot create pods, and keep retrying.
        wait_for("the ReplicaSet's FailedCreate event", lambda: any(
            e["reason"] == "FailedCreate" and INJECTION_REFUSED in e["message"]
            for e in cluster.kubectl_json("get", "events", "-n", mesh)["items"]))
        assert pods(cluster, mesh) == []
    finally:
        meshguard.start()
    # No manual action: the ReplicaSet's next retry goes through, injected.
    (created,) = wait_for("the ReplicaSet's pod", lambda: pods(cluster, mesh), timeout=180)
    assert injected(created)


def point_injection_at(cluster: ControlPlane, url: str) -> None:
    cluster.kubectl("patch", "mutatingwebhookconfiguration", RELEASE, "--type=json", "-p", json.dumps([
        {"op": "replace", "path": f"/webhooks/{i}/clientConfig/url", "value": url} for i in (0, 1)]))


def test_injector_unavailable_with_failure_policy_ignore_leaves_nothing_silently_unmeshed(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    mesh = make_namespace(MESH)
    cluster.apply([network_policy()], "-n", mesh)
    meshguard.install("--reuse-values", "--set", "webhooks.injection.failurePolicy=Ignore")
    unmeshed = f'meshguard_unmeshed_pods_admitted_total{{namespace="{mesh}",reason="not-injected"}}'
    try:
        # The injector unreachable (a dead address here; in a cluster, say, timing out) while validation answers:
        # a controller's pod gets in without the sidecar (owned pods are only warned on), and /validate counts it.
        point_injection_at(cluster, f"https://127.0.0.1:{free_port()}/mutate")
        cluster.apply([deployment("api")], "-n", mesh)
        (slipped,) = wait_for("the ReplicaSet's pod", lambda: pods(cluster, mesh), timeout=120)
        assert not injected(slipped)
        assert meshguard.metric(unmeshed) == 1
        # meshguard down altogether: a pod gets in that it never sees.
        meshguard.stop()
        # Polled: the API server picks up changed webhook configurations asynchronously.
        wait_for("the pod admitted without meshguard",
                 lambda: cluster.apply([pod("web")], "-n", mesh, check=False).returncode == 0)
        assert not injected(cluster.kubectl_json("get", "pod", "web", "-n", mesh))
    finally:
        if not meshguard.alive():
            meshguard.start()
        # The chart's own value back before Helm applies it again, so that Helm's server-side apply sees no conflict.
        point_injection_at(cluster, f"{meshguard.url}/mutate")
        meshguard.install("--reuse-values", "--set", "webhooks.injection.failurePolicy=Fail")
    # `meshguard audit` lists both, with the fix.
    audit = subprocess.run([sys.executable, "-m", "webhook", "audit", "--kubeconfig", str(cluster.kubeconfig),
                            "-o", "json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert audit.returncode == 1, audit.stderr  # 1: something fails (these pods, and other tests' leftovers)
    found = {p["name"]: p["message"] for p in json.loads(audit.stdout)["podsWithoutSidecar"] if p["namespace"] == mesh}
    assert sorted(found) == sorted(["web", slipped["metadata"]["name"]]), found


def test_api_server_restart_keeps_meshguard_ready_and_watches_resume(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    """Unready replicas (all at once: they follow the same API server) would refuse every mesh pod (injection
    fails closed) until their watches resumed, after the API server was back."""
    ns = make_namespace(MESH)
    assert meshguard.readyz().status_code == 200
    failed = 'meshguard_state_watch_restarts_total{kind="Namespace",reason="error"}'
    before = meshguard.metric(failed)
    cluster.components["kube-apiserver"].stop(timeout=10)
    try:
        wait_for("a watch to fail", lambda: meshguard.metric(failed) > before)
        ready = meshguard.readyz()
        assert ready.status_code == 200 and ready.json()["checks"]["state"] is True, ready.text
    finally:
        cluster.start_apiserver()
    stored = meshguard.metric('meshguard_state_objects{kind="NetworkPolicy"}')
    # A policy created after the restart, and at once a workload it covers: admitted, not denied on a stale view.
    cluster.apply([network_policy()], "-n", ns)
    cluster.apply([deployment("web")], "-n", ns)
    # And the resumed watch delivers the policy by itself.
    wait_for("the watch to deliver the policy",
             lambda: meshguard.metric('meshguard_state_objects{kind="NetworkPolicy"}') == stored + 1)


def served_serial(port: int, ca: str) -> int:
    """The serial number of the certificate meshguard presents in a new handshake."""
    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_serving_certificate_rotated_while_pods_are_created_fails_no_admission(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ns = make_namespace(MESH)
    cluster.apply([network_policy()], "-n", ns)
    template = pod("web")
    template["metadata"] = {"generateName": "web-", "labels": {"app": "web"}}
    ca = str(meshguard.cert_dir / "ca.crt")
    before = served_serial(meshguard.port, ca)
    batches: list[Batch] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            batches.append(create_pods(cluster, ns, template, 10, 2))

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        wait_for("pods created before the rotation", lambda: batches)
        # What cert-manager or a Secret volume update does: a new pair from the same CA, written in place.
        rotated = certs.generate_serving(meshguard.cert_dir, RELEASE, RELEASE_NAMESPACE, dev=True)
        serial = rotated.cert.serial_number
        assert serial != before
        wait_for("the new certificate served", lambda: served_serial(meshguard.port, ca) == serial)
        done = len(batches)
        wait_for("pods created after the rotation", lambda: len(batches) >= done + 2)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert [f for b in batches for f in b.failures] == []
    created = pods(cluster, ns)
    assert len(created) == sum(b.created for b in batches) and all(injected(p) for p in created)

"""Fixtures of the real-node scenarios: a control plane with one real node, meshguard installed by its chart.

The session brings up etcd, kube-apiserver and kube-controller-manager (``tests/e2e/cluster.py``) on the node's
address, then the node (``tests/node/node.py``) with the images of ``tests/node/images.py``, then runs
``helm install`` of ``charts/meshguard`` with the meshguard image: the API server calls meshguard through its
Service, as in any cluster. Everything is torn down at the end, failed tests or not; the component logs, and the
cluster's pods and events, are kept under ``artifacts/node/`` when a test failed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, run_folder
from tests.e2e.cluster import (
    EXEMPT_LABEL,
    RELEASE,
    RELEASE_NAMESPACE,
    BinariesMissing,
    ControlPlane,
    binaries,
    wait_for,
)
from tests.e2e.conftest import create_namespace
from tests.e2e.objects import EXEMPT, MESH, webhooks_answering
from tests.node import dns, images
from tests.node.node import Node, NodeUnavailable, check_machine, node_ip

ARTIFACTS = ROOT / "artifacts" / "node"
# The PeerAuthentication CRD a scenario installs is looked for every 2 s (not the default minute).
CHART_CONFIG = {"policy": {"exempt": {"namespace_selectors": [{"matchLabels": {EXEMPT_LABEL: "true"}}]},
                           "state": {"crd_poll_seconds": 2}}}


@pytest.fixture(scope="session")
def node_workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """This session's folder under ``artifacts/node/``."""
    yield from run_folder(ARTIFACTS, request)


@pytest.fixture(scope="session")
def node_cluster(node_workdir: Path, request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """The control plane with a Ready node whose containerd holds the project's images."""
    try:
        check_machine()
        bin_dir = binaries()
        address = node_ip()
    except (NodeUnavailable, BinariesMissing) as missing:
        pytest.skip(str(missing))
    cluster = ControlPlane(bin_dir, node_workdir / "cluster", node_ip=address)
    node = Node(cluster, node_workdir / "cluster" / "logs")
    problems: list[str] = []
    try:
        cluster.start()
        archives = images.build(node_workdir / "images", bin_dir / "pause", bin_dir / "coredns")
        node.start(list(archives.values()))
        cluster.apply(dns.objects())
        cluster.kubectl("rollout", "status", "deployment/coredns", "-n", dns.NAMESPACE, "--timeout=120s",
                        timeout=130)
        yield cluster
    finally:
        if request.session.testsfailed:
            _keep_state(cluster, node_workdir)
        problems = node.stop()
        cluster.stop()
        shutil.rmtree(node_workdir / "images", ignore_errors=True)
    assert not problems, f"the node left things behind: {problems}"


def _keep_state(cluster: ControlPlane, workdir: Path) -> None:
    """What the cluster looked like when a test failed: pods, events and every container's log."""
    if not cluster.api_ready_quietly():
        return
    out = workdir / "state"
    out.mkdir(exist_ok=True)
    for what in ("pods", "events", "deployments,replicasets,jobs,services,endpointslices"):
        result = cluster.kubectl("get", what, "-A", "-o", "wide", check=False)
        (out / f"{what.split(',')[0]}.txt").write_text(result.stdout + result.stderr)
    pods = cluster.kubectl("get", "pods", "-A", "-o", "json", check=False)
    for item in json.loads(pods.stdout or '{"items": []}')["items"]:
        meta = item["metadata"]
        spec = item["spec"]
        for container in [*(spec.get("initContainers") or []), *spec["containers"]]:
            log = cluster.kubectl("logs", meta["name"], "-n", meta["namespace"], "-c", container["name"],
                                  check=False)
            (out / f"{meta['namespace']}.{meta['name']}.{container['name']}.log").write_text(log.stdout + log.stderr)


@pytest.fixture(scope="session")
def meshguard_installed(node_cluster: ControlPlane) -> ControlPlane:
    """``helm install`` of the chart with the locally built image; returned once both webhooks answer."""
    node_cluster.helm("install", RELEASE, str(ROOT / "charts" / "meshguard"), "--namespace", RELEASE_NAMESPACE,
                      "--create-namespace", "--set", "replicaCount=2", "--set", "audit.enabled=true",
                      "--set-json", f"config={json.dumps(CHART_CONFIG)}",
                      "--wait", "--timeout", "5m")
    mesh = create_namespace(node_cluster, "probe-mesh", {**MESH, **EXEMPT})
    plain = create_namespace(node_cluster, "probe-plain", {})

    def answering() -> bool:
        try:
            return webhooks_answering(node_cluster, mesh, plain) == (True, True)
        except AssertionError:  # refused until kube-proxy has the Service's endpoints: not yet
            return False

    wait_for("the API server to call meshguard in the cluster", answering, timeout=120)
    node_cluster.kubectl("delete", "namespace", mesh, plain, "--wait=false")
    return node_cluster


@dataclass
class Cluster:
    """What the scenarios use: kubectl on the node's cluster, namespaces, and waits on real pods."""

    plane: ControlPlane
    make: Callable[[str, dict[str, str]], str]

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.plane.kubectl(*args, check=check, timeout=timeout)

    def json(self, *args: str) -> dict[str, Any]:
        return self.plane.kubectl_json(*args)

    def apply(self, objects: list[dict[str, Any]], namespace: str) -> None:
        self.plane.apply(objects, "-n", namespace)

    def mesh_namespace(self, name: str) -> str:
        """A namespace labeled for injection, with a NetworkPolicy admitting traffic to every pod (the policy's
        coverage rule). Nothing else: each proxy gets its own certificate from meshguard's signer."""
        namespace = self.make(name, MESH)
        self.apply([allow_all_ingress()], namespace)
        return namespace

    def plain_namespace(self, name: str) -> str:
        """A namespace outside the mesh, exempt from meshguard's policy by the configured label."""
        return self.make(name, EXEMPT)

    def wait_ready(self, namespace: str, selector: str, timeout: int = 120) -> list[dict[str, Any]]:
        self.kubectl("wait", "--for=create", "pod", "-l", selector, "-n", namespace, f"--timeout={timeout}s",
                     timeout=timeout + 10)
        self.kubectl("wait", "--for=condition=Ready", "pod", "-l", selector, "-n", namespace,
                     f"--timeout={timeout}s", timeout=timeout + 10)
        return self.json("get", "pods", "-l", selector, "-n", namespace)["items"]

    def wait_routed(self, namespace: str, service: str, timeout: int = 60) -> str:
        """The Service's ClusterIP, once kube-proxy sends it to at least one endpoint: a pod is Ready before its
        Service's rules are written, and a call in between is refused or leaves by the default route."""
        ip = self.json("get", "service", service, "-n", namespace)["spec"]["clusterIP"]

        def routed() -> bool:
            rules = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
            # KUBE-SVL-: the chain of a Service whose internal traffic stays on the node.
            match = re.search(rf"^-A KUBE-SERVICES -d {re.escape(ip)}/32 .*-j (KUBE-SV[CL]-\w+)$", rules, re.M)
            return bool(match) and re.search(rf"^-A {match.group(1)} .*-j KUBE-SEP-", rules, re.M) is not None

        wait_for(f"kube-proxy to route Service {namespace}/{service}", routed, timeout=timeout)
        return ip

    def exec(self, namespace: str, pod: str, *command: str, container: str = "app",
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.kubectl("exec", pod, "-n", namespace, "-c", container, "--", *command, check=False,
                            timeout=timeout)

    def get(self, namespace: str, pod: str, url: str) -> subprocess.CompletedProcess[str]:
        """``GET url`` from the app container of ``pod`` (through its sidecar when it has one)."""
        return self.exec(namespace, pod, str(images.PYTHON), "/app/app.py", "get", url)

    def logs(self, namespace: str, pod: str, container: str) -> str:
        return self.kubectl("logs", pod, "-n", namespace, "-c", container).stdout


@pytest.fixture
def cluster(meshguard_installed: ControlPlane,
            request: pytest.FixtureRequest) -> Iterator[Cluster]:
    created: list[str] = []
    test = request.node.name.lower().removeprefix("test_")
    prefix = "n-" + "".join(c if c.isalnum() else "-" for c in test)[:16].strip("-")

    def make(name: str, labels: dict[str, str]) -> str:
        created.append(create_namespace(meshguard_installed, f"{prefix}-{name}", labels))
        return created[-1]

    yield Cluster(meshguard_installed, make)
    if created:
        meshguard_installed.kubectl("delete", "namespace", *created, "--wait=false", check=False)


def allow_all_ingress() -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "allow-ingress"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]}}

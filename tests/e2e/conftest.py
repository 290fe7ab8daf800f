"""Session fixtures: a real control plane, meshguard serving it from loopback, and the Helm chart installed.

The chart is installed with its ``webhooks.url`` override pointing at the meshguard process, so the webhook
configurations and RBAC the API server uses are the chart's own. Component logs are kept under
``artifacts/e2e/<run>/`` when a test fails (CI keeps that folder) and removed otherwise.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_folder
from tests.e2e.cluster import BinariesMissing, ControlPlane, Meshguard, binaries, wait_for
from tests.e2e.objects import EXEMPT, MESH, webhooks_answering

ARTIFACTS = ROOT / "artifacts" / "e2e"
_serial = itertools.count()


@pytest.fixture(scope="session")
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """This session's folder under ``artifacts/e2e/``."""
    yield from run_folder(ARTIFACTS, request)


def running_plane(directory: Path, apiserver_args: tuple[str, ...] = ()) -> Iterator[ControlPlane]:
    """A control plane started in ``directory`` for a fixture to yield from, stopped afterwards; the test is
    skipped when the binaries are not built."""
    try:
        bin_dir = binaries()
    except BinariesMissing as missing:
        pytest.skip(str(missing))
    plane = ControlPlane(bin_dir, directory, apiserver_args=apiserver_args)
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def cluster(workdir: Path) -> Iterator[ControlPlane]:
    yield from running_plane(workdir / "cluster")


@pytest.fixture(scope="session")
def meshguard(cluster: ControlPlane, workdir: Path) -> Iterator[Meshguard]:
    """meshguard serving the cluster through the chart's webhooks; returned once both webhooks answer."""
    mg = Meshguard(cluster, workdir / "meshguard")
    mg.install()
    mg.start()
    try:
        wait_until_admitting(cluster)
        yield mg
    finally:
        mg.stop(signal.SIGKILL)


def wait_until_admitting(cluster: ControlPlane) -> None:
    """Wait until the API server calls both webhooks (it loads webhook configurations asynchronously)."""
    mesh = create_namespace(cluster, "probe-mesh", {**MESH, **EXEMPT})
    plain = create_namespace(cluster, "probe-plain", {})
    try:
        wait_for("the API server to call meshguard", lambda: webhooks_answering(cluster, mesh, plain) == (True, True))
    finally:
        cluster.kubectl("delete", "namespace", mesh, plain, "--wait=false")


def create_namespace(cluster: ControlPlane, prefix: str, labels: dict[str, str]) -> str:
    """A fresh namespace with ``labels``, returned once its default ServiceAccount exists (the ServiceAccount
    admission plugin refuses pods until the controller manager has made it)."""
    name = f"{prefix[:48].rstrip('-')}-{next(_serial)}"
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}])
    wait_for(f"the default ServiceAccount of {name}", lambda: cluster.kubectl(
        "get", "serviceaccount", "default", "-n", name, check=False).returncode == 0)
    return name


@pytest.fixture
def make_namespace(cluster: ControlPlane, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """``make_namespace(labels)``: a fresh namespace named after the test; all are deleted afterwards."""
    created: list[str] = []
    test = request.node.name.lower().removeprefix("test_")
    prefix = "t-" + "".join(c if c.isalnum() else "-" for c in test)[:20].strip("-")

    def make(labels: dict[str, str] | None = None) -> str:
        created.append(create_namespace(cluster, prefix, labels or {}))
        return created[-1]

    yield make
    if created:
        cluster.kubectl("delete", "namespace", *created, "--wait=false", check=False)

"""Pods in the mesh without the sidecar: which ones count (the pure rule), and ``meshguard audit`` listing them
through the CLI against a scripted API server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_state_kube import FakeAPI, listing
from webhook.cli import main
from webhook.config import Settings
from webhook.injection.decision import PROXY_NAME, STATUS_ANNOTATION
from webhook.policy.unmeshed import REASONS, unmeshed_reason
from webhook.workloads import as_workload

MESH = {"meshguard.io/inject": "enabled"}
SETTINGS = Settings(injection={"exclude_namespaces": ["legacy"]})
OWNER = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u", "controller": True}]


def pod(name: str = "web-1-a", namespace: str = "shop", labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None, proxy: str | None = None, **spec: Any) -> dict[str, Any]:
    """``proxy``: None, "containers" (classic sidecar) or "initContainers" (native sidecar)."""
    body: dict[str, Any] = {"containers": [{"name": "app", "image": "web"}], **spec}
    if proxy:
        body.setdefault(proxy, []).append({"name": PROXY_NAME, "image": "envoy"})
    meta = {"name": name, "namespace": namespace, "labels": labels or {"app": "web"},
            "annotations": annotations or {}, "ownerReferences": OWNER}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": body}


CASES = [
    ("injected, classic", pod(proxy="containers"), MESH, None),
    ("injected, native", pod(proxy="initContainers"), MESH, None),
    ("injector missed it", pod(), MESH, "not-injected"),
    ("opted in by pod label, missed", pod(labels={"meshguard.io/inject": "true"}), {}, "not-injected"),
    ("status annotation, no container", pod(annotations={STATUS_ANNOTATION: "{}"}), MESH, "status-without-proxy"),
    ("not in the mesh", pod(), {}, None),
    ("opt-out label", pod(labels={"meshguard.io/inject": "false"}), MESH, None),
    ("opt-out annotation", pod(annotations={"meshguard.io/inject": "false"}), MESH, None),
    ("hostNetwork", pod(hostNetwork=True), MESH, None),
    ("excluded namespace", pod(namespace="legacy"), MESH, None),
    ("system namespace", pod(namespace="kube-system"), MESH, None),
    ("meshguard's own namespace", pod(namespace="meshguard"), MESH, None),
]


@pytest.mark.parametrize(("obj", "namespace_labels", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_unmeshed_reason(obj: dict[str, Any], namespace_labels: dict[str, str], reason: str | None) -> None:
    workload = as_workload(obj)
    assert workload is not None
    assert unmeshed_reason(workload, namespace_labels, SETTINGS) == reason
    assert reason is None or reason in REASONS


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    fake = FakeAPI()
    fake.lists["/api/v1/namespaces"] = [listing([
        {"metadata": {"name": "shop", "resourceVersion": "1", "labels": MESH}},
        {"metadata": {"name": "plain", "resourceVersion": "1", "labels": {}}},
    ], "10")]
    fake.lists["/apis/networking.k8s.io/v1/networkpolicies"] = [listing([], "10")]
    fake.lists["/api/v1/pods"] = [listing([
        pod("web-1-a", proxy="initContainers"),
        pod("web-1-b"),  # created while the injector was down
        pod("web-1-c", annotations={STATUS_ANNOTATION: "{}"}),  # claims injection, has no proxy
        pod("web-1-d", labels={"meshguard.io/inject": "false"}),  # opted out
        pod("other-1-a", namespace="plain"),  # not in the mesh
    ], "10")]
    for path in ("/api/v1/replicationcontrollers", "/apis/apps/v1/deployments", "/apis/apps/v1/statefulsets",
                 "/apis/apps/v1/daemonsets", "/apis/apps/v1/replicasets", "/apis/batch/v1/jobs",
                 "/apis/batch/v1/cronjobs"):
        fake.lists[path] = [listing([], "10")]
    yield fake
    fake.close()


def test_audit_lists_the_pods_that_slipped_through(api: FakeAPI, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    code = main(["audit", "--kubeconfig", str(kubeconfig), "-o", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [p["name"] for p in report["podsWithoutSidecar"]] == ["web-1-b", "web-1-c"]
    assert report["podsWithoutSidecar"][0]["message"].startswith(
        "Pod shop/web-1-b: in the mesh but has no meshguard-proxy container")
    assert report["summary"]["podsWithoutSidecar"] == 2

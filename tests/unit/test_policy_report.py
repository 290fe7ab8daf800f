"""The audit report's logic on objects as a cluster lists them (no API server needed)."""

from __future__ import annotations

import json
from typing import Any

from webhook.config import Settings
from webhook.policy import report
from webhook.policy.engine import Engine
from webhook.state.files import build_store

OWNER = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u", "controller": True}]


def pod(name: str, namespace: str, proxy: bool = False, owned: bool = True, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {"app": "web"}}
    if owned:
        meta["ownerReferences"] = OWNER
    containers = [{"name": "app", "image": "web"}] + ([{"name": "meshguard-proxy", "image": "envoy"}] if proxy else [])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": containers, **extra}}


def deployment(name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": namespace},
            "spec": {"template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": []}}}}


STATE = [
    {"apiVersion": "v1", "kind": "Namespace",
     "metadata": {"name": "shop", "labels": {"meshguard.io/inject": "enabled"}}},
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "plain"}},
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
     "metadata": {"name": "deny-all", "namespace": "shop"}, "spec": {"podSelector": {}}},
]


def audit(objects: list[dict[str, Any]]) -> report.Report:
    store, problems = build_store(STATE, "default")
    assert not problems
    settings = Settings()
    return report.audit(Engine(settings), store, settings, objects)


def test_owned_objects_are_judged_through_their_owner() -> None:
    result = audit([deployment("web", "shop"), pod("web-1-a", "shop", proxy=True),
                    {**deployment("web-1", "shop"), "kind": "ReplicaSet",
                     "metadata": {"name": "web-1", "namespace": "shop", "ownerReferences": OWNER}}])
    assert [e.workload.display for e in result.evaluations] == ["Deployment shop/web"]
    assert not result.failed


def test_pods_in_the_mesh_without_the_sidecar_are_listed() -> None:
    result = audit([
        pod("web-1-a", "shop", proxy=True),  # injected
        pod("web-1-b", "shop"),  # created while the injector was down
        pod("web-1-c", "shop", hostNetwork=True),  # never injected: not a finding
        pod("web-1-d", "plain"),  # not in the mesh
        {**pod("web-1-e", "plain"), "metadata": {"name": "web-1-e", "namespace": "plain", "ownerReferences": OWNER,
                                                  "labels": {"meshguard.io/inject": "true"}}},  # opted in by label
    ])
    assert [p.name for p in result.without_sidecar] == ["web-1-b", "web-1-e"]
    assert result.failed and result.evaluations == ()
    text = report.render_text(result)
    assert ("  Pod shop/web-1-b: in the mesh but has no meshguard-proxy container (created while the injector was "
            "down?); delete it so that its controller recreates it with the sidecar") in text
    assert text.endswith("0 workloads: 0 failed, 0 passed, 0 exempt; 2 pods without the sidecar\n")


def test_json_report_of_a_mixed_cluster() -> None:
    result = audit([deployment("web", "shop"), deployment("api", "plain"), deployment("dns", "kube-system"),
                    pod("lone", "shop", owned=False)])
    body = json.loads(report.render_json(result))
    by_name = {w["name"]: w for w in body["workloads"]}
    assert by_name["web"]["passed"] is True and by_name["dns"]["exempt"] == "namespace kube-system is always exempt"
    assert [r["rule"] for r in by_name["api"]["rules"] if not r["passed"]] == ["network-policy", "mtls"]
    # A bare pod (no owner) is both evaluated and, lacking the proxy in a mesh namespace, listed.
    assert by_name["lone"]["passed"] is False
    assert body["podsWithoutSidecar"][0]["name"] == "lone"
    assert body["summary"] == {"workloads": 4, "failed": 2, "exempt": 1, "podsWithoutSidecar": 1}

"""Real-world manifests: Online Boutique with its own NetworkPolicies, Bookinfo with policies written here."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import CORPUS
from webhook import manifests
from webhook.config import Settings
from webhook.policy import report
from webhook.policy.engine import MTLS, NETWORK_POLICY, Engine, Evaluation
from webhook.state.files import build_store
from webhook.workloads import iter_workloads

BOUTIQUE = CORPUS / "online-boutique" / "kubernetes-manifests.yaml"
BOUTIQUE_POLICIES = CORPUS / "online-boutique" / "network-policies"
BOOKINFO = CORPUS / "bookinfo" / "bookinfo.yaml"
MESH = {"meshguard.io/inject": "enabled"}


def run(objects: list[dict[str, Any]], settings: Settings | None = None,
        ns_labels: dict[str, str] | None = None) -> dict[str, Evaluation]:
    store, problems = build_store(objects, "shop", ns_labels or MESH)
    assert problems == []
    checked = report.check(Engine(settings or Settings()), store, iter_workloads(objects, "shop"))
    return {e.workload.name: e for e in checked.evaluations}


def rule(evaluation: Evaluation, name: str):
    return next(r for r in evaluation.results if r.rule == name)


def deployments(objects: list[dict[str, Any]]) -> set[str]:
    return {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}


def test_online_boutique_alone_fails_coverage_for_every_deployment() -> None:
    objects = manifests.load([BOUTIQUE])
    results = run(objects)
    assert set(results) == deployments(objects) and len(results) == 12
    for name, evaluation in results.items():
        r = rule(evaluation, NETWORK_POLICY)
        assert not r.passed, name
        app = evaluation.workload.labels["app"]
        assert r.message.startswith(f"Deployment shop/{name}: no NetworkPolicy selects pods with labels {{app={app}}}")
        # The namespace is in the mesh and nothing weakens mTLS: only coverage fails.
        assert rule(evaluation, MTLS).passed


def test_online_boutique_with_its_policies_passes_for_every_deployment() -> None:
    results = run(manifests.load([BOUTIQUE, BOUTIQUE_POLICIES]))
    assert len(results) == 12
    assert all(e.passed for e in results.values()), [r.message for e in results.values() for r in e.failures]


def test_online_boutique_per_service_policies_select_their_own_pods() -> None:
    """Without the deny-all, coverage must come from each service's own policy. Each isolates both directions,
    except loadgenerator's, which has ``policyTypes: [Egress]`` and so leaves its Ingress open."""
    policies = [o for o in manifests.load([BOUTIQUE_POLICIES]) if o["metadata"]["name"] != "deny-all"]
    settings = Settings(policy={"network_policy": {"directions": ["Ingress", "Egress"]}})
    results = run(manifests.load([BOUTIQUE]) + policies, settings)
    for name, evaluation in results.items():
        r = rule(evaluation, NETWORK_POLICY)
        if name == "loadgenerator":
            assert not r.passed and "{app=loadgenerator} for Ingress;" in r.message
            continue
        assert r.passed and r.detail == f"NetworkPolicy coverage: Ingress by {name}, Egress by {name}"


def bookinfo_policies(skip: str = "") -> list[dict[str, Any]]:
    apps = {"details": {"matchLabels": {"app": "details"}},
            "ratings": {"matchLabels": {"app": "ratings"}},
            # One policy for the three versions of reviews, by expression rather than by label.
            "reviews": {"matchLabels": {"app": "reviews"},
                        "matchExpressions": [{"key": "version", "operator": "In", "values": ["v1", "v2", "v3"]}]},
            "productpage": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["productpage"]}]}}
    return [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name},
             "spec": {"podSelector": selector, "ingress": [{"from": [{"podSelector": {}}]}]}}
            for name, selector in apps.items() if name != skip]


def test_bookinfo_alone_fails_and_with_policies_passes() -> None:
    objects = manifests.load([BOOKINFO])
    alone = run(objects)
    assert set(alone) == deployments(objects) == {"details-v1", "ratings-v1", "reviews-v1", "reviews-v2",
                                                  "reviews-v3", "productpage-v1"}
    assert not any(rule(e, NETWORK_POLICY).passed for e in alone.values())
    covered = run(objects + bookinfo_policies())
    assert all(e.passed for e in covered.values())


def test_bookinfo_without_the_reviews_policy_fails_exactly_the_three_reviews() -> None:
    results = run(manifests.load([BOOKINFO]) + bookinfo_policies(skip="reviews"))
    assert {name for name, e in results.items() if not e.passed} == {"reviews-v1", "reviews-v2", "reviews-v3"}
    assert "{app=reviews, version=v2}" in rule(results["reviews-v2"], NETWORK_POLICY).message


@pytest.mark.parametrize("mode", ["PERMISSIVE", "DISABLE"])
def test_bookinfo_with_a_weak_namespace_peer_authentication_fails_mtls(mode: str) -> None:
    weak = {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
            "metadata": {"name": "default"}, "spec": {"mtls": {"mode": mode}}}
    results = run(manifests.load([BOOKINFO]) + bookinfo_policies() + [weak])
    for evaluation in results.values():
        assert [r.rule for r in evaluation.failures] == [MTLS]
        assert f"mutual TLS mode is {mode} (PeerAuthentication shop/default)" in evaluation.failures[0].message


def test_bookinfo_outside_the_mesh_fails_mtls_only() -> None:
    results = run(manifests.load([BOOKINFO]) + bookinfo_policies(), ns_labels={"team": "books"})
    assert all([r.rule for r in e.failures] == [MTLS] for e in results.values())

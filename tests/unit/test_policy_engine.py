"""The policy engine on plain objects: rule results, messages, actions, exemptions."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.conftest import as_injected
from webhook.config import Settings, load
from webhook.policy.engine import MTLS, NETWORK_POLICY, Engine, Evaluation, least_strict
from webhook.state.files import build_store
from webhook.workloads import as_workload

MESH = {"meshguard.io/inject": "enabled"}


def deployment(name: str = "payment", labels: dict[str, str] | None = None, pod_spec: dict[str, Any] | None = None,
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
    labels = {"app": name} if labels is None else labels
    meta: dict[str, Any] = {"labels": labels}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": labels},
                     "template": {"metadata": meta,
                                  "spec": pod_spec or {"containers": [{"name": "app", "image": "shop/app:1"}]}}}}


def pod(name: str = "payment-7d4b9", labels: dict[str, str] | None = None, proxy: bool = False,
        owner: bool = False, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    containers = [{"name": "app", "image": "shop/app:1"}]
    meta: dict[str, Any] = {"name": name, "labels": {"app": "payment"} if labels is None else labels}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "payment-7d4b9",
                                    "uid": "1", "controller": True}]
    if annotations:
        meta["annotations"] = annotations
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": containers}}
    return as_injected(obj) if proxy else obj  # the proxy as the injector adds it


def netpol(name: str, selector: dict[str, Any] | None = None, types: list[str] | None = None,
           egress: list[Any] | None = None, namespace: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": selector or {}}
    if types is not None:
        spec["policyTypes"] = types
    if egress is not None:
        spec["egress"] = egress
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec}


def peer_auth(name: str, mode: str, selector: dict[str, str] | None = None, namespace: str = "shop",
              ports: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = ports
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


DENY_ALL = netpol("deny-all")


def evaluate(obj: dict[str, Any], state: list[dict[str, Any]] = (), ns_labels: dict[str, str] | None = None,
             settings: Settings | None = None, namespace: str = "shop", **kwargs: Any) -> Evaluation:
    store, problems = build_store(list(state), namespace, MESH if ns_labels is None else ns_labels)
    assert not problems
    workload = as_workload(copy.deepcopy(obj), namespace)
    assert workload is not None
    return Engine(settings or Settings()).evaluate(workload, store, **kwargs)


def result(evaluation: Evaluation, rule: str):
    return next(r for r in evaluation.results if r.rule == rule)


# -- NetworkPolicy coverage --------------------------------------------------------------------------------------

def test_missing_network_policy_message_names_workload_rule_and_fix() -> None:
    r = result(evaluate(deployment()), NETWORK_POLICY)
    assert not r.passed and r.action == "enforce"
    assert r.message == ("Deployment shop/payment: no NetworkPolicy selects pods with labels {app=payment} for "
                         "Ingress; create one (a default-deny with podSelector {} is enough)")
    assert r.warning.startswith("Deployment shop/payment: no NetworkPolicy selects it for Ingress")
    assert len(r.warning) < 120


@pytest.mark.parametrize(
    ("policies", "passed"),
    [
        ([DENY_ALL], True),
        ([netpol("p", {"matchLabels": {"app": "payment"}})], True),
        ([netpol("p", {"matchLabels": {"app": "cart"}})], False),
        ([netpol("p", {"matchLabels": {"app": "payment", "tier": "web"}})], False),
        ([netpol("p", {"matchExpressions": [{"key": "app", "operator": "In", "values": ["cart", "payment"]}]})], True),
        ([netpol("p", {"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]})], True),
        ([netpol("p", {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["payment"]}]})], False),
        ([netpol("p", types=["Egress"])], False),  # isolates Egress only
        ([netpol("p", namespace="other")], False),  # policies select pods of their own namespace only
        ([{**DENY_ALL, "apiVersion": "crd.projectcalico.org/v1"}], False),  # not a Kubernetes NetworkPolicy
    ],
)
def test_coverage_follows_selector_and_namespace(policies: list[dict[str, Any]], passed: bool) -> None:
    assert result(evaluate(deployment(), policies), NETWORK_POLICY).passed is passed


@pytest.mark.parametrize(
    ("policies", "missing"),
    [
        ([DENY_ALL], "Egress"),  # policyTypes omitted, no egress rules: Ingress only
        ([netpol("p", egress=[{}])], None),  # policyTypes omitted with egress rules: both
        ([netpol("p", egress=[])], "Egress"),
        ([netpol("p", types=["Ingress", "Egress"])], None),  # a default deny of both directions
        ([netpol("i", types=["Ingress"]), netpol("e", types=["Egress"])], None),  # different policies may cover
        ([netpol("e", types=["Egress"])], "Ingress"),
        ([], "Ingress and Egress"),
    ],
)
def test_required_directions(policies: list[dict[str, Any]], missing: str | None) -> None:
    settings = Settings(policy={"network_policy": {"directions": ["Egress", "Ingress"]}})
    r = result(evaluate(deployment(), policies, settings=settings), NETWORK_POLICY)
    assert r.passed is (missing is None)
    if missing:
        assert f"for {missing};" in r.message


def test_passing_result_says_which_policy_covers() -> None:
    r = result(evaluate(deployment(), [netpol("payment", {"matchLabels": {"app": "payment"}}), DENY_ALL]),
               NETWORK_POLICY)
    assert r.passed and r.detail == "NetworkPolicy coverage: Ingress by deny-all"


def test_pod_labels_are_the_template_labels_and_controllers_all_work() -> None:
    policy = netpol("p", {"matchLabels": {"app": "batch"}})
    template = {"metadata": {"labels": {"app": "batch"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
    cron = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly", "labels": {"app": "other"}},
            "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": template}}}}
    assert result(evaluate(cron, [policy]), NETWORK_POLICY).passed
    cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"] = {"app": "other"}
    r = result(evaluate(cron, [policy]), NETWORK_POLICY)
    assert not r.passed and r.message.startswith("CronJob shop/nightly: no NetworkPolicy selects pods with labels "
                                                 "{app=other}")


# -- mTLS --------------------------------------------------------------------------------------------------------

def test_mesh_namespace_with_default_strict_passes() -> None:
    r = result(evaluate(deployment(), [DENY_ALL]), MTLS)
    assert r.passed
    assert r.detail == ("pods carry the meshguard sidecar; mutual TLS is STRICT "
                        "(no PeerAuthentication applies; meshguard's default is STRICT)")


def test_namespace_outside_the_mesh_fails_with_the_label_to_add() -> None:
    r = result(evaluate(deployment(), [DENY_ALL], ns_labels={}), MTLS)
    assert not r.passed
    assert r.message == (
        "Deployment shop/payment: its pods will run without the meshguard sidecar (namespace shop is not labeled "
        "meshguard.io/inject=enabled), so they have no mutual TLS; label namespace shop meshguard.io/inject=enabled")


def test_pod_label_opts_in_outside_a_mesh_namespace() -> None:
    obj = deployment(labels={"app": "payment", "meshguard.io/inject": "true"})
    assert result(evaluate(obj, [DENY_ALL], ns_labels={}), MTLS).passed


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        (deployment(labels={"app": "payment", "meshguard.io/inject": "false"}), "opted out with the label"),
        (deployment(annotations={"meshguard.io/inject": "false"}), "opted out with the annotation"),
        (deployment(pod_spec={"hostNetwork": True, "containers": [{"name": "a", "image": "i"}]}),
         "; run it without hostNetwork, or ask the platform team to exempt it in policy.exempt"),
        (deployment(pod_spec={"containers": [{"name": "a", "image": "i"}, {"name": "istio-proxy", "image": "p"}]}),
         "another mesh's sidecar (Istio or Linkerd), and two proxies cannot both capture its traffic), so they have "
         "no mutual TLS; remove the other mesh's injection from it"),
    ],
)
def test_opted_out_or_uninjectable_templates_fail(obj: dict[str, Any], fragment: str) -> None:
    r = result(evaluate(obj, [DENY_ALL]), MTLS)
    assert not r.passed and fragment in r.message


def test_a_bare_pod_is_judged_by_its_containers() -> None:
    assert result(evaluate(pod(proxy=True), [DENY_ALL]), MTLS).passed
    # Injected even though its namespace is not in the mesh (any more): the proxy is there.
    assert result(evaluate(pod(proxy=True), [DENY_ALL], ns_labels={}), MTLS).passed
    missed = result(evaluate(pod(), [DENY_ALL]), MTLS)
    assert not missed.passed and "meshguard's injector did not add it" in missed.message
    assert missed.message.endswith("; delete and recreate the pod")
    # The status annotation is not the sidecar: a workload could write it itself.
    claimed = result(evaluate(pod(annotations={"meshguard.io/status": "injected"}), [DENY_ALL]), MTLS)
    assert not claimed.passed and "no meshguard-proxy container" in claimed.message
    assert claimed.message.endswith("recreate it without the meshguard.io/status annotation")


@pytest.mark.parametrize(
    ("peer_auths", "fragment"),
    [
        ([peer_auth("default", "PERMISSIVE")],
         "mutual TLS mode is PERMISSIVE (PeerAuthentication shop/default), so plaintext is accepted; "
         "set its spec.mtls.mode to STRICT"),
        ([peer_auth("mesh", "DISABLE", namespace="istio-system")],
         "mutual TLS mode is DISABLE (PeerAuthentication istio-system/mesh)"),
        ([peer_auth("default", "STRICT"), peer_auth("payment", "STRICT", {"app": "payment"},
                                                    ports={"8080": {"mode": "PERMISSIVE"}})],
         "port 8080 is PERMISSIVE (portLevelMtls of PeerAuthentication shop/payment), so plaintext is accepted there"),
    ],
)
def test_weak_peer_authentication_fails_naming_the_policy(peer_auths: list[dict[str, Any]], fragment: str) -> None:
    r = result(evaluate(deployment(), [DENY_ALL, *peer_auths]), MTLS)
    assert not r.passed and fragment in r.message
    assert len(r.warning) < 120


def test_configured_default_mode_and_root_namespace() -> None:
    settings = Settings(policy={"mtls": {"default_mode": "PERMISSIVE", "root_namespace": "mesh-root"}})
    r = result(evaluate(deployment(), [DENY_ALL], settings=settings), MTLS)
    assert not r.passed
    assert r.message.endswith("create a PeerAuthentication in namespace shop with spec.mtls.mode STRICT")
    strict_root = peer_auth("mesh", "STRICT", namespace="mesh-root")
    assert result(evaluate(deployment(), [DENY_ALL, strict_root], settings=settings), MTLS).passed


# -- actions -----------------------------------------------------------------------------------------------------

def actions(evaluation: Evaluation) -> dict[str, str]:
    return {r.rule: r.action for r in evaluation.results}


def test_configured_actions_per_rule() -> None:
    settings = Settings(policy={"network_policy": {"action": "warn"}, "mtls": {"action": "audit"}})
    assert actions(evaluate(deployment(), settings=settings)) == {NETWORK_POLICY: "warn", MTLS: "audit"}


@pytest.mark.parametrize(("label", "expected"), [("audit", "audit"), ("warn", "warn"), ("enforce", "enforce"),
                                                 ("bogus", "warn")])
def test_namespace_label_overrides_every_rule(label: str, expected: str) -> None:
    settings = Settings(policy={"network_policy": {"action": "warn"}, "mtls": {"action": "warn"}})
    evaluation = evaluate(deployment(), ns_labels={**MESH, "meshguard.io/policy": label}, settings=settings)
    assert actions(evaluation) == {NETWORK_POLICY: expected, MTLS: expected}


def test_the_workload_cannot_choose_its_own_action() -> None:
    obj = deployment(labels={"app": "payment", "meshguard.io/policy": "audit"},
                     annotations={"meshguard.io/policy": "audit"})
    assert actions(evaluate(obj)) == {NETWORK_POLICY: "enforce", MTLS: "enforce"}


def test_controller_owned_pods_are_only_warned_on_by_default() -> None:
    owned = evaluate(pod(owner=True))
    assert not owned.passed and actions(owned) == {NETWORK_POLICY: "warn", MTLS: "warn"}
    assert actions(evaluate(pod(owner=False))) == {NETWORK_POLICY: "enforce", MTLS: "enforce"}
    strict = Settings(policy={"owned_action": "enforce"})
    assert actions(evaluate(pod(owner=True), settings=strict)) == {NETWORK_POLICY: "enforce", MTLS: "enforce"}
    # The cap never raises an action.
    audit_ns = evaluate(pod(owner=True), ns_labels={**MESH, "meshguard.io/policy": "audit"})
    assert actions(audit_ns) == {NETWORK_POLICY: "audit", MTLS: "audit"}


def test_cap_and_least_strict() -> None:
    assert actions(evaluate(deployment(), cap="warn")) == {NETWORK_POLICY: "warn", MTLS: "warn"}
    assert least_strict("enforce", "audit") == "audit" and least_strict("warn", "enforce") == "warn"


# -- exemptions --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("namespace", "policy", "ns_labels", "labels", "fragment"),
    [
        ("kube-system", {}, {}, None, "namespace kube-system is always exempt"),
        ("meshguard", {}, {}, None, "namespace meshguard is always exempt"),
        ("legacy", {"exempt": {"namespaces": ["legacy"]}}, {}, None, "listed in policy.exempt.namespaces"),
        ("shop", {"exempt": {"namespace_selectors": [{"matchLabels": {"team": "platform"}}]}}, {"team": "platform"},
         None, "matches policy.exempt.namespace_selectors (team=platform)"),
        ("shop", {"exempt": {"namespace_selectors": [{"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop"]}]}]}}, {}, None,
         "matches policy.exempt.namespace_selectors"),
        ("shop", {"exempt": {"workload_selectors": [{"matchLabels": {"app": "legacy"}}]}}, {}, {"app": "legacy"},
         "its pod labels match policy.exempt.workload_selectors (app=legacy)"),
    ],
)
def test_exemptions_come_from_configuration(namespace: str, policy: dict[str, Any], ns_labels: dict[str, str],
                                            labels: dict[str, str] | None, fragment: str) -> None:
    evaluation = evaluate(deployment(labels=labels), ns_labels=ns_labels, settings=Settings(policy=policy),
                          namespace=namespace)
    assert evaluation.exempt is not None and fragment in evaluation.exempt
    assert evaluation.passed and evaluation.results == ()


def test_own_namespace_follows_settings_and_non_matching_exemptions_do_not_apply() -> None:
    settings = Settings(namespace="mesh-system",
                        policy={"exempt": {"workload_selectors": [{"matchLabels": {"app": "legacy"}}]}})
    assert evaluate(deployment(), settings=settings, namespace="mesh-system").exempt
    assert evaluate(deployment(), settings=settings, namespace="meshguard").exempt is None
    assert evaluate(deployment(), settings=settings).exempt is None


def test_invalid_exemption_selector_is_a_config_error() -> None:
    from webhook.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        load(overrides={"policy": {"exempt": {"namespace_selectors": [{"matchExpressions": [
            {"key": "a", "operator": "Equals", "values": ["b"]}]}]}}})
    assert "policy.exempt.namespace_selectors" in str(raised.value) and "operator must be one of" in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        load(overrides={"policy": {"network_policy": {"directions": ["Inbound"]}}})
    assert "Ingress and Egress" in str(raised.value)


def test_warnings_stay_under_120_characters_with_long_names() -> None:
    obj = deployment(name="a" * 200, labels={"app": "b" * 60, "tier": "c" * 60})
    evaluation = evaluate(obj, namespace="n" * 63, ns_labels={})
    assert all(not r.passed and len(r.warning) < 120 for r in evaluation.results)
    # The name is cut, never the fix at the end.
    assert all("…: " in r.warning and r.warning.endswith(r.short) for r in evaluation.results)

"""PeerAuthentication resolution, level by level, the way Istio composes it."""

from __future__ import annotations

from typing import Any

import pytest

from webhook.policy.mtls import PeerAuthentication, parse_peer_authentication, resolve

ROOT = "istio-system"
APP = {"app": "payment", "version": "v1"}


def pa(namespace: str, name: str, mode: str | None = None, selector: dict[str, str] | None = None,
       ports: dict[str, Any] | None = None, created: str = "2024-01-01T00:00:00Z") -> PeerAuthentication:
    spec: dict[str, Any] = {}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if ports is not None:
        spec["portLevelMtls"] = ports
    obj = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
           "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created}, "spec": spec}
    return parse_peer_authentication(obj, namespace)


def effective(policies: list[PeerAuthentication], namespace: str = "shop", labels: dict[str, str] = APP,
              default: str = "STRICT") -> tuple[str, str | None, tuple[tuple[str, str], ...]]:
    result = resolve(labels, [p for p in policies if p.namespace == namespace],
                     [p for p in policies if p.namespace == ROOT], namespace, ROOT, default)  # type: ignore[arg-type]
    return result.mode, result.source.name if result.source else None, result.weak_ports


@pytest.mark.parametrize(
    ("policies", "expected"),
    [
        pytest.param([], ("STRICT", None, ()), id="nothing-applies-configured-default"),
        pytest.param([pa(ROOT, "mesh", "PERMISSIVE")], ("PERMISSIVE", "mesh", ()), id="mesh-wide"),
        pytest.param([pa(ROOT, "mesh", "PERMISSIVE"), pa("shop", "ns", "STRICT")], ("STRICT", "ns", ()),
                     id="namespace-over-mesh"),
        pytest.param([pa(ROOT, "mesh", "STRICT"), pa("shop", "ns", "DISABLE")], ("DISABLE", "ns", ()),
                     id="namespace-can-weaken"),
        pytest.param([pa("shop", "ns", "PERMISSIVE"), pa("shop", "wl", "STRICT", {"app": "payment"})],
                     ("STRICT", "wl", ()), id="workload-over-namespace"),
        pytest.param([pa("shop", "ns", "STRICT"), pa("shop", "wl", "PERMISSIVE", {"app": "payment"})],
                     ("PERMISSIVE", "wl", ()), id="workload-can-weaken"),
        pytest.param([pa("shop", "ns", "STRICT"), pa("shop", "wl", "PERMISSIVE", {"app": "other"})],
                     ("STRICT", "ns", ()), id="workload-selector-must-match"),
        pytest.param([pa("shop", "ns", "STRICT"), pa("shop", "wl", "PERMISSIVE", {"app": "payment", "x": "y"})],
                     ("STRICT", "ns", ()), id="selector-labels-must-all-be-present"),
        pytest.param([pa(ROOT, "mesh", "PERMISSIVE"), pa("shop", "ns", "UNSET")], ("PERMISSIVE", "mesh", ()),
                     id="unset-namespace-inherits-mesh"),
        pytest.param([pa(ROOT, "mesh", "PERMISSIVE"), pa("shop", "ns")], ("PERMISSIVE", "mesh", ()),
                     id="no-mtls-block-is-unset"),
        pytest.param([pa("shop", "ns", "PERMISSIVE"), pa("shop", "wl", "UNSET", {"app": "payment"})],
                     ("PERMISSIVE", "ns", ()), id="unset-workload-inherits-namespace"),
        pytest.param([pa(ROOT, "mesh", "UNSET")], ("STRICT", None, ()), id="unset-everywhere-is-the-default"),
        pytest.param([pa("shop", "ns", "PERMISSIVE", {})], ("PERMISSIVE", "ns", ()),
                     id="empty-selector-is-namespace-wide"),
        pytest.param([pa(ROOT, "root-wl", "PERMISSIVE", {"app": "payment"})], ("STRICT", None, ()),
                     id="selector-policies-in-the-root-namespace-apply-to-no-one-else"),
        pytest.param([pa("other", "ns", "DISABLE")], ("STRICT", None, ()), id="other-namespaces-do-not-apply"),
        pytest.param([pa("shop", "new", "PERMISSIVE", created="2024-02-01T00:00:00Z"),
                      pa("shop", "old", "STRICT", created="2024-01-01T00:00:00Z")],
                     ("STRICT", "old", ()), id="oldest-namespace-policy-wins"),
        pytest.param([pa("shop", "b", "PERMISSIVE"), pa("shop", "a", "STRICT")], ("STRICT", "a", ()),
                     id="same-age-name-order"),
        pytest.param([pa("shop", "wl", "STRICT", {"app": "payment"}, {"8080": {"mode": "PERMISSIVE"},
                                                                       "9090": {"mode": "STRICT"}})],
                     ("STRICT", "wl", (("8080", "PERMISSIVE"),)), id="weak-port"),
        pytest.param([pa("shop", "ns", "PERMISSIVE"),
                      pa("shop", "wl", "UNSET", {"app": "payment"}, {"8080": {"mode": "UNSET"}})],
                     ("PERMISSIVE", "ns", (("8080", "PERMISSIVE"),)), id="unset-port-inherits-resolved-mode"),
        pytest.param([pa("shop", "wl", "STRICT", {"app": "payment"}, {"8080": {}})], ("STRICT", "wl", ()),
                     id="unset-port-under-strict-is-fine"),
        pytest.param([pa("shop", "ns", "STRICT", ports={"8080": {"mode": "DISABLE"}})], ("STRICT", "ns", ()),
                     id="port-level-on-namespace-policy-is-ignored-like-istio"),
    ],
)
def test_resolution(policies: list[PeerAuthentication], expected: tuple[Any, ...]) -> None:
    assert effective(policies) == expected


def test_configured_default_applies_only_when_nothing_does() -> None:
    assert effective([], default="PERMISSIVE") == ("PERMISSIVE", None, ())
    assert effective([pa("shop", "ns", "STRICT")], default="PERMISSIVE") == ("STRICT", "ns", ())


def test_the_root_namespace_own_workloads_get_the_mesh_policy() -> None:
    policies = [pa(ROOT, "mesh", "PERMISSIVE"), pa(ROOT, "wl", "STRICT", {"app": "payment"})]
    assert effective(policies, namespace=ROOT) == ("PERMISSIVE", "mesh", ())


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"mtls": {"mode": "strict"}}, "mode must be one of"),
        ({"mtls": {"mode": ["STRICT"]}}, "mode must be one of"),
        # Keys that are not a port Envoy can match (Python's isdigit() takes "²"; int() does not).
        *(({"portLevelMtls": {key: {"mode": "DISABLE"}}}, "portLevelMtls must map port numbers")
          for key in ("0", "65536", "99999999999", "\u00b2", " 80", "http")),
        ({"portLevelMtls": [8080]}, "portLevelMtls must map port numbers"),
        ({"portLevelMtls": {"8080": {"mode": "TLS"}}}, "portLevelMtls[8080]: mode must be one of"),
        ({"selector": {"matchLabels": {"app": 1}}}, "matchLabels must map"),
    ],
)
def test_invalid_peer_authentications_are_rejected(spec: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_peer_authentication({"metadata": {"name": "bad"}, "spec": spec}, "shop")
    assert "PeerAuthentication shop/bad" in str(raised.value) and fragment in str(raised.value)

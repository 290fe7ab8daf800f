"""The control plane's resources: who gets mutual TLS, with which identities, and each port's inbound mode."""

from __future__ import annotations

from typing import Any

import pytest

from webhook import envoy
from webhook.injection.settings import InjectionSettings
from webhook.policy.mtls import Resolver
from webhook.state.store import Store
from webhook.xds import resources
from webhook.xds.plane import CLUSTER, ENDPOINTS, LISTENER, pack

OPTIONS = InjectionSettings().bootstrap_options()
RESOLVER = Resolver("istio-system", "STRICT")


def pod(name: str, ip: str, meshed: bool = True, account: str = "default", excluded: str = "15021,15090",
        labels: dict[str, str] | None = None, phase: str = "Running") -> dict[str, Any]:
    spec: dict[str, Any] = {"serviceAccountName": account, "containers": [{"name": "app"}]}
    if meshed:
        spec["initContainers"] = [{"name": "meshguard-init", "args": ["netinit", "--exclude-inbound-ports", excluded]},
                                  {"name": "meshguard-proxy"}]
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "shop", "labels": labels or {}}, "spec": spec,
            "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]}}


def service(name: str, cluster_ip: str | None, port: int = 80) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": cluster_ip or "None", "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}}


def endpoints(name: str, pods: list[tuple[str, str]], target: int = 8080) -> dict[str, Any]:
    return {"kind": "EndpointSlice", "metadata": {"name": f"{name}-1", "namespace": "shop",
                                                  "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "http", "port": target, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": p, "namespace": "shop"}} for p, ip in pods]}


def peer_auth(name: str, mode: str, selector: dict[str, str] | None = None,
              ports: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = {port: {"mode": m} for port, m in ports.items()}
    return {"kind": "PeerAuthentication", "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


def store(*objects: dict[str, Any]) -> Store:
    state = Store()
    for kind in ("Pod", "Service", "EndpointSlice", "PeerAuthentication"):
        state.replace(kind, [o for o in objects if o["kind"] == kind])
    return state


def lb_endpoints(outbound: resources.Outbound, cluster: str) -> dict[str, bool]:
    """address -> marked for mutual TLS"""
    found = {}
    for group in outbound.load_assignments[cluster]["endpoints"]:
        for entry in group["lb_endpoints"]:
            address = entry["endpoint"]["address"]["socket_address"]["address"]
            marked = {"filter_metadata": {resources.TLS_MATCH_KEY: resources.TLS_MATCH}}
            found[address] = entry.get("metadata") == marked
    return found


def peer_ids(cluster: dict[str, Any]) -> list[str]:
    (match,) = cluster["transport_socket_matches"]
    context = match["transport_socket"]["typed_config"]["common_tls_context"]
    sans = context["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]
    return [san["matcher"]["exact"] for san in sans]


def test_meshed_endpoints_get_mutual_tls_with_their_identities_and_the_others_plaintext() -> None:
    state = store(pod("api-1", "10.0.0.1", account="api"), pod("api-2", "10.0.0.2", account="api-v2"),
                  pod("legacy", "10.0.0.3", meshed=False), service("api", "10.96.0.10"),
                  endpoints("api", [("api-1", "10.0.0.1"), ("api-2", "10.0.0.2"), ("legacy", "10.0.0.3")]))
    outbound = resources.outbound(state, RESOLVER, OPTIONS)
    name = "outbound|80||api.shop"
    assert lb_endpoints(outbound, name) == {"10.0.0.1": True, "10.0.0.2": True, "10.0.0.3": False}
    assert peer_ids(outbound.clusters[name]) == ["spiffe://cluster.local/ns/shop/sa/api",
                                                 "spiffe://cluster.local/ns/shop/sa/api-v2"]


def test_a_service_of_unmeshed_pods_has_no_tls_at_all() -> None:
    state = store(pod("db", "10.0.0.3", meshed=False), service("db", "10.96.0.11", 5432),
                  endpoints("db", [("db", "10.0.0.3")], 5432))
    outbound = resources.outbound(state, RESOLVER, OPTIONS)
    assert "transport_socket_matches" not in outbound.clusters["outbound|5432||db.shop"]
    assert lb_endpoints(outbound, "outbound|5432||db.shop") == {"10.0.0.3": False}


@pytest.mark.parametrize(("pod_kwargs", "policies"), [
    ({"excluded": "15021,15090,8080"}, []),  # the pod leaves the port uncaptured
    ({}, [peer_auth("off", "DISABLE")]),  # its PeerAuthentication turns mTLS off
    ({"labels": {"app": "api"}}, [peer_auth("port", "STRICT", {"app": "api"}, {"8080": "DISABLE"})]),
])
def test_plaintext_where_the_meshed_pod_does_not_take_mutual_tls(pod_kwargs: dict[str, Any],
                                                                  policies: list[dict[str, Any]]) -> None:
    state = store(pod("api-1", "10.0.0.1", **pod_kwargs), service("api", "10.96.0.10"),
                  endpoints("api", [("api-1", "10.0.0.1")]), *policies)
    assert lb_endpoints(resources.outbound(state, RESOLVER, OPTIONS), "outbound|80||api.shop") == {"10.0.0.1": False}


def _chains(outbound: resources.Outbound) -> dict[str, dict[str, Any]]:
    return {chain["name"]: chain["filter_chain_match"] for chain in outbound.listener["filter_chains"]}


def test_the_outbound_listener_routes_cluster_ips_and_meshed_pod_ips() -> None:
    state = store(pod("api-1", "10.0.0.1"), pod("old", "10.0.0.1", phase="Succeeded"),
                  pod("legacy", "10.0.0.3", meshed=False), service("api", "10.96.0.10"),
                  service("headless", None, 9000), endpoints("api", [("api-1", "10.0.0.1")]))
    chains = _chains(resources.outbound(state, RESOLVER, OPTIONS))
    host = {"address_prefix": "10.0.0.1", "prefix_len": 32}
    assert chains["outbound|80||api.shop"] == {
        "destination_port": 80, "prefix_ranges": [{"address_prefix": "10.96.0.10", "prefix_len": 32}]}
    # Port 80 has chains of its own, so it needs its own meshed-pod and passthrough chains (no backtracking).
    assert chains["outbound-mesh-80"] == {"destination_port": 80, "prefix_ranges": [host]}
    assert chains["outbound-passthrough-80"] == {"destination_port": 80}
    assert chains["outbound-mesh"] == {"prefix_ranges": [host]}
    # The ports the meshed pod leaves uncaptured stay plaintext to it.
    assert chains["outbound-passthrough-15021"] == {"destination_port": 15021}
    assert "outbound-mesh-15021" not in chains
    assert not any("headless" in name for name in chains)  # no ClusterIP: reached by pod IP


@pytest.mark.parametrize(("policies", "expected"), [
    ([], {None: ["tls"]}),
    ([peer_auth("ns", "PERMISSIVE")], {None: ["tls", "raw_buffer"]}),
    ([peer_auth("ns", "DISABLE")], {None: [None]}),
    ([peer_auth("w", "PERMISSIVE", {"app": "api"}, {"9090": "STRICT", "9091": "UNSET", "9092": "DISABLE"})],
     {None: ["tls", "raw_buffer"], 9090: ["tls"], 9091: ["tls", "raw_buffer"], 9092: [None]}),
])
def test_inbound_modes_follow_the_same_resolver_as_the_mtls_rule(policies: list[dict[str, Any]],
                                                                  expected: dict[int | None, list[str | None]]) -> None:
    state = store(pod("api-1", "10.0.0.1", labels={"app": "api"}), *policies)
    listener = envoy.inbound_listener(OPTIONS, *RESOLVER.modes(state, "shop", {"app": "api"}))
    found: dict[int | None, list[str | None]] = {}
    for chain in listener["filter_chains"]:
        match = chain.get("filter_chain_match", {})
        port = match.get("destination_port")
        if port in (OPTIONS.inbound_port, OPTIONS.outbound_port, OPTIONS.admin_port):
            continue  # the blackhole chains
        found.setdefault(port, []).append(match.get("transport_protocol"))
        assert ("transport_socket" in chain) == (match.get("transport_protocol") == "tls")
    assert found == expected


def test_every_resource_is_valid_envoy_configuration() -> None:
    """Packing goes through the protobuf schema: an unknown field or a wrong type raises here, not in a proxy."""
    state = store(pod("api-1", "10.0.0.1", labels={"app": "api"}), service("api", "10.96.0.10"),
                  endpoints("api", [("api-1", "10.0.0.1")]),
                  peer_auth("w", "PERMISSIVE", {"app": "api"}, {"9092": "DISABLE"}))
    outbound = resources.outbound(state, RESOLVER, OPTIONS)
    for name, cluster in outbound.clusters.items():
        pack(CLUSTER, name, cluster)
    for name, assignment in outbound.load_assignments.items():
        pack(ENDPOINTS, name, assignment)
    pack(LISTENER, "outbound", outbound.listener)
    pack(LISTENER, "inbound", envoy.inbound_listener(OPTIONS, *RESOLVER.modes(state, "shop", {"app": "api"})))
    assert envoy.MESH_CLUSTER in outbound.clusters

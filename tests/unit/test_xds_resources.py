"""The control plane's resources: who gets mutual TLS, with which identities, and each port's inbound mode."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from webhook import envoy
from webhook.injection.settings import InjectionSettings
from webhook.metrics import Metrics
from webhook.policy.mtls import Resolver
from webhook.state.store import Store
from webhook.xds import resources
from webhook.xds.plane import CLUSTER, ENDPOINTS, LISTENER, ControlPlane, pack
from webhook.xds.settings import XdsSettings

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


def service(name: str, cluster_ip: str | None, port: int = 80, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": cluster_ip or "None", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                     **(spec or {})}}


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


def built(state: Store) -> resources.Outbound:
    return resources.outbound(state, resources.PodModes(RESOLVER, state), OPTIONS)


def store(*objects: dict[str, Any]) -> Store:
    state = Store()
    for kind in ("Pod", "Service", "EndpointSlice", "PeerAuthentication", "ServiceCIDR"):
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
    """The SPIFFE IDs the cluster's TLS accepts: of its mTLS endpoints' socket, or of the cluster's own."""
    if "transport_socket_matches" in cluster:
        (match,) = cluster["transport_socket_matches"]
        socket = match["transport_socket"]
    else:
        socket = cluster["transport_socket"]
    context = socket["typed_config"]["common_tls_context"]
    sans = context["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]
    return [san["matcher"]["exact"] for san in sans]


def test_meshed_endpoints_get_mutual_tls_with_their_identities_and_the_others_plaintext() -> None:
    state = store(pod("api-1", "10.0.0.1", account="api"), pod("api-2", "10.0.0.2", account="api-v2"),
                  pod("legacy", "10.0.0.3", meshed=False), service("api", "10.96.0.10"),
                  endpoints("api", [("api-1", "10.0.0.1"), ("api-2", "10.0.0.2"), ("legacy", "10.0.0.3")]))
    outbound = built(state)
    name = "outbound|80||api.shop"
    assert lb_endpoints(outbound, name) == {"10.0.0.1": True, "10.0.0.2": True, "10.0.0.3": False}
    assert peer_ids(outbound.clusters["outbound|10.96.0.10:80"]) == ["spiffe://cluster.local/ns/shop/sa/api",
                                                 "spiffe://cluster.local/ns/shop/sa/api-v2"]


def test_a_service_of_unmeshed_pods_has_no_tls_at_all() -> None:
    state = store(pod("db", "10.0.0.3", meshed=False), service("db", "10.96.0.11", 5432),
                  endpoints("db", [("db", "10.0.0.3")], 5432))
    outbound = built(state)
    assert "transport_socket_matches" not in outbound.clusters["outbound|10.96.0.11:5432"]
    assert lb_endpoints(outbound, "outbound|5432||db.shop") == {"10.0.0.3": False}



def _conditions(slice_: dict[str, Any], by_address: dict[str, dict[str, bool]]) -> dict[str, Any]:
    for item in slice_["endpoints"]:
        item["conditions"] = by_address.get(item["addresses"][0], item["conditions"])
    return slice_


DRAINING = {"ready": False, "serving": True, "terminating": True}


@pytest.mark.parametrize(("conditions", "expected"), [
    # Nothing ready: the endpoints terminating but serving take the traffic, with mutual TLS to their identity.
    ({"10.0.0.1": DRAINING, "10.0.0.2": DRAINING}, {"10.0.0.1": True, "10.0.0.2": True}),
    # One ready: it alone, as kube-proxy does.
    ({"10.0.0.1": DRAINING}, {"10.0.0.2": True}),
    # Terminating and no longer serving (or never said to be): no endpoint.
    ({"10.0.0.1": {**DRAINING, "serving": False}, "10.0.0.2": {"ready": False, "terminating": True}}, {}),
    ({"10.0.0.1": {**DRAINING, "serving": None}, "10.0.0.2": {**DRAINING, "serving": None}}, {}),  # null: as ready
])
def test_a_service_with_no_ready_endpoint_falls_back_to_those_still_serving(
        conditions: dict[str, dict[str, bool]], expected: dict[str, bool]) -> None:
    slice_ = _conditions(endpoints("api", [("api-1", "10.0.0.1"), ("api-2", "10.0.0.2")]), conditions)
    state = store(pod("api-1", "10.0.0.1", account="old"), pod("api-2", "10.0.0.2", account="new"),
                  service("api", "10.96.0.10"), slice_)
    outbound = built(state)
    assert lb_endpoints(outbound, "outbound|80||api.shop") == expected
    cluster = outbound.clusters["outbound|10.96.0.10:80"]
    accounts = {"10.0.0.1": "old", "10.0.0.2": "new"}
    if expected:
        assert peer_ids(cluster) == sorted(f"spiffe://cluster.local/ns/shop/sa/{accounts[ip]}" for ip in expected)
    else:
        assert "transport_socket_matches" not in cluster


@pytest.mark.parametrize("spec", [{"internalTrafficPolicy": "Local"}, {"sessionAffinity": "ClientIP"}])
@pytest.mark.parametrize(("meshed", "expected_ids"), [
    ((True, True), ["spiffe://cluster.local/ns/shop/sa/api"]),  # every endpoint meshed: mutual TLS
    ((True, False), None),  # some not: plaintext, which PERMISSIVE takes from both
    ((), None),  # none at all: kube-proxy refuses, as without the proxy
])
def test_a_service_whose_endpoint_depends_on_the_caller_is_dialled_at_its_cluster_ip(
        spec: dict[str, str], meshed: tuple[bool, ...], expected_ids: list[str] | None) -> None:
    pods = [pod(f"api-{i}", f"10.0.0.{i}", meshed=m, account="api") for i, m in enumerate(meshed, 1)]
    state = store(*pods, service("api", "10.96.0.10", spec=spec),
                  endpoints("api", [(f"api-{i}", f"10.0.0.{i}") for i in range(1, len(meshed) + 1)]))
    outbound = built(state)
    cluster = outbound.clusters["outbound|10.96.0.10:80"]
    # kube-proxy picks the endpoint (by the caller's node or address): no endpoints of meshguard's choosing.
    assert (cluster["type"], cluster["lb_policy"]) == ("ORIGINAL_DST", "CLUSTER_PROVIDED")
    assert cluster["alt_stat_name"] == "outbound|80||api.shop"
    assert "outbound|80||api.shop" not in outbound.load_assignments
    if expected_ids is None:
        assert "transport_socket" not in cluster
    else:
        assert peer_ids(cluster) == expected_ids

@pytest.mark.parametrize(("pod_kwargs", "policies"), [
    ({"excluded": "15021,15090,8080"}, []),  # the pod leaves the port uncaptured
    ({}, [peer_auth("off", "DISABLE")]),  # its PeerAuthentication turns mTLS off
    ({"labels": {"app": "api"}}, [peer_auth("port", "STRICT", {"app": "api"}, {"8080": "DISABLE"})]),
])
def test_plaintext_where_the_meshed_pod_does_not_take_mutual_tls(pod_kwargs: dict[str, Any],
                                                                  policies: list[dict[str, Any]]) -> None:
    state = store(pod("api-1", "10.0.0.1", **pod_kwargs), service("api", "10.96.0.10"),
                  endpoints("api", [("api-1", "10.0.0.1")]), *policies)
    assert lb_endpoints(built(state), "outbound|80||api.shop") == {"10.0.0.1": False}


def _rules(listener: dict[str, Any]) -> list[tuple[str, Any]]:
    """The listener's matcher as (what it matches, where it sends): a chain, or per port with None for the rest."""
    def target(on_match: dict[str, Any]) -> Any:
        if "action" in on_match:
            return on_match["action"]["typed_config"]["value"]
        tree = on_match["matcher"]
        ports = {int(port): target(m) for port, m in tree["matcher_tree"]["exact_match_map"]["map"].items()}
        return {**ports, None: target(tree["on_no_match"])}

    rules = []
    for matcher in listener["filter_chain_matcher"]["matcher_list"]["matchers"]:
        predicate = matcher["predicate"]["single_predicate"]
        if "value_match" in predicate:
            what: Any = ("port", int(predicate["value_match"]["exact"]))
        else:
            ranges = predicate["custom_match"]["typed_config"]["cidr_ranges"]
            what = ("ip", [f"{r['address_prefix']}/{r['prefix_len']}" for r in ranges])
        rules.append((what, target(matcher["on_match"])))
    rules.append((("otherwise", None), target(listener["filter_chain_matcher"]["on_no_match"])))
    return rules


def test_the_outbound_listener_matches_each_cluster_ip_and_meshed_pod_ip_once() -> None:
    state = store(pod("api-1", "10.0.0.1"), pod("api-2", "10.0.0.2"), pod("old", "10.0.0.1", phase="Succeeded"),
                  pod("batch", "10.0.1.9", excluded=""), pod("legacy", "10.0.0.3", meshed=False),
                  service("api", "10.96.0.10"), service("web", "10.96.0.11", 8080), service("headless", None, 9000),
                  endpoints("api", [("api-1", "10.0.0.1")]))
    outbound = built(state)
    assert _rules(outbound.listener) == [
        (("ip", ["10.96.0.10/31"]), "outbound-services"),  # ClusterIPs, whatever their ports (the capture port too)
        (("port", OPTIONS.outbound_port), "outbound-blackhole"),  # reached directly, not redirected: closed
        (("ip", ["10.0.1.9/32"]), "outbound-mesh"),
        # The ports these pods leave uncaptured stay plaintext to them.
        (("ip", ["10.0.0.1/32", "10.0.0.2/32"]),
         {15021: "outbound-passthrough", 15090: "outbound-passthrough", None: "outbound-mesh"}),
        (("otherwise", None), "outbound-passthrough"),
    ]
    # The services chain names each connection's cluster after its destination: one cluster per ClusterIP port.
    assert {name for name in outbound.clusters if "10.96" in name} == {"outbound|10.96.0.10:80",
                                                                      "outbound|10.96.0.11:8080"}
    assert outbound.clusters["outbound|10.96.0.10:80"]["eds_cluster_config"]["service_name"] == "outbound|80||api.shop"
    assert not any("headless" in name for name in outbound.load_assignments)  # no ClusterIP: reached by pod IP


def test_a_pods_uncaptured_ports_beyond_the_annotations_limit_are_not_taken() -> None:
    """Every proxy's listener carries each meshed pod's uncaptured ports: a list of thousands written into a pod
    admitted under warn or audit would swell it for all (and its own clients then speak mutual TLS to it)."""
    many = ",".join(map(str, range(1000, 1033)))
    state = store(pod("api-1", "10.0.0.1", excluded=many), pod("api-2", "10.0.0.2", excluded="0,8080"))
    assert _rules(built(state).listener)[1:] == [(("ip", ["10.0.0.1/32", "10.0.0.2/32"]), "outbound-mesh"),
                                                 (("otherwise", None), "outbound-passthrough")]


def service_cidr(*cidrs: str) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "kubernetes"},
            "spec": {"cidrs": list(cidrs)}}


def test_with_service_cidrs_the_listener_matches_their_ranges_and_a_new_service_leaves_it_as_it_was() -> None:
    state = store(service("api", "10.96.0.10"), service("odd", "192.168.5.5"),
                  service_cidr("10.96.0.0/12", "fd00::/108", "10.96.0.0/16"))
    plane = ControlPlane(state, RESOLVER, OPTIONS, XdsSettings(), Metrics())
    state.subscribe(plane.changed)
    first = plane.rebuild()
    (services,) = [what for what, where in _rules(orjson.loads(first.outbound.json)) if where == "outbound-services"]
    # The ranges, once each; a ClusterIP outside every range (allocated before its ServiceCIDR went) on its own.
    assert services == ("ip", ["10.96.0.0/12", "fd00::/108", "192.168.5.5/32"])
    state.apply("Service", "ADDED", service("web", "10.96.0.11", 8080))
    second = plane.rebuild()
    # Its cluster is new; every proxy's listener already routes its address.
    assert "outbound|10.96.0.11:8080" in second.changed[CLUSTER]
    assert second.changed[LISTENER] == frozenset() and second.outbound is first.outbound


def test_a_dual_stack_service_has_a_cluster_per_address_sharing_its_endpoints() -> None:
    dual = service("api", "10.96.0.10")
    dual["spec"]["clusterIPs"] = ["10.96.0.10", "fd00:0:0::a"]
    outbound = built(store(dual))
    # Named as Envoy prints the destination address: IPv6 compressed, in brackets.
    for name in ("outbound|10.96.0.10:80", "outbound|[fd00::a]:80"):
        assert outbound.clusters[name]["eds_cluster_config"]["service_name"] == "outbound|80||api.shop"


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
                  service("local", "10.96.0.11", spec={"internalTrafficPolicy": "Local"}),
                  endpoints("local", [("api-1", "10.0.0.1")]),
                  peer_auth("w", "PERMISSIVE", {"app": "api"}, {"9092": "DISABLE"}))
    outbound = built(state)
    assert outbound.clusters["outbound|10.96.0.11:80"]["type"] == "ORIGINAL_DST"
    for name, cluster in outbound.clusters.items():
        pack(CLUSTER, name, cluster)
    for name, assignment in outbound.load_assignments.items():
        pack(ENDPOINTS, name, assignment)
    pack(LISTENER, "outbound", outbound.listener)
    pack(LISTENER, "inbound", envoy.inbound_listener(OPTIONS, *RESOLVER.modes(state, "shop", {"app": "api"})))
    assert envoy.MESH_CLUSTER in outbound.clusters


def test_neighbouring_meshed_pods_share_the_fewest_prefixes() -> None:
    ips = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.8", "10.0.0.9", "10.0.0.10", "10.0.0.11", "10.0.0.20",
           "fd00::1", "fd00::0"]
    state = store(*(pod(f"p{i}", ip, excluded="") for i, ip in enumerate(ips)))
    (mesh,) = [what for what, where in _rules(built(state).listener)
               if where == "outbound-mesh"]
    assert mesh == ("ip", ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.8/30", "10.0.0.20/32", "fd00::/127"])


def test_addresses_envoy_would_print_otherwise_are_left_out() -> None:
    state = store(pod("mapped", "::ffff:10.0.0.1", excluded=""), pod("zoned", "fe80::1%eth0", excluded=""),
                  pod("plain", "10.0.0.2", excluded=""))
    (mesh,) = [what for what, where in _rules(built(state).listener)
               if where == "outbound-mesh"]
    assert mesh == ("ip", ["10.0.0.2/32"])


def test_a_peer_authentication_or_a_pods_new_labels_reach_its_modes_on_both_sides() -> None:
    """Each pod's modes are kept between rebuilds: a PeerAuthentication change, or the pod's own, must not be
    answered from what was kept (its inbound listener and its clients' endpoints)."""
    state = store(pod("api-1", "10.0.0.1", labels={"app": "api"}), service("api", "10.96.0.10"),
                  endpoints("api", [("api-1", "10.0.0.1")]))
    asked: list[str] = []

    class Counting(Resolver):
        def modes(self, *args: Any) -> Any:
            asked.append(args[1])
            return super().modes(*args)

    plane = ControlPlane(state, Counting("istio-system", "STRICT"), OPTIONS, XdsSettings(), Metrics())
    state.subscribe(plane.changed)

    def seen() -> tuple[dict[str, Any], bool]:
        snapshot = plane.rebuild()
        record = state.catalog.pod("shop", "api-1")
        assert record is not None
        (inbound,) = [orjson.loads(item.json) for name, item in plane.wanted(snapshot, LISTENER, record,
                                                                             frozenset()).items() if name != "outbound"]
        (entry,) = orjson.loads(snapshot.assignments["outbound|80||api.shop"].json)["endpoints"][0]["lb_endpoints"]
        return inbound, "metadata" in entry

    assert seen() == (envoy.inbound_listener(OPTIONS, "STRICT", {}), True)
    assert len(asked) == 1  # once for both sides
    assert seen() == (envoy.inbound_listener(OPTIONS, "STRICT", {}), True)
    assert len(asked) == 1  # kept: nothing it depends on changed
    state.apply("PeerAuthentication", "ADDED", peer_auth("off", "DISABLE"))
    assert seen() == (envoy.inbound_listener(OPTIONS, "DISABLE", {}), False)
    state.apply("PeerAuthentication", "ADDED", peer_auth("web", "STRICT", {"app": "web"}))
    assert seen() == (envoy.inbound_listener(OPTIONS, "DISABLE", {}), False)
    state.apply("Pod", "MODIFIED", pod("api-1", "10.0.0.1", labels={"app": "web"}))
    assert seen() == (envoy.inbound_listener(OPTIONS, "STRICT", {}), True)


def test_a_snapshot_that_cannot_be_built_leaves_the_last_one_and_later_changes_still_push(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    state = store(service("api", "10.96.0.10"))
    plane = ControlPlane(state, RESOLVER, OPTIONS, XdsSettings(debounce_seconds=0), Metrics())
    state.subscribe(plane.changed)
    first = plane.rebuild()
    woken: list[int] = []
    plane.follow(lambda: woken.append(plane.current().generation))
    build = resources.outbound

    def broken_once(*args: Any) -> Any:
        monkeypatch.setattr(resources, "outbound", build)
        raise RuntimeError("a bug")

    async def scenario() -> None:
        task = asyncio.create_task(plane.run())
        monkeypatch.setattr(resources, "outbound", broken_once)
        state.replace("Service", [service("api", "10.96.0.10"), service("db", "10.96.0.11")])
        while "xds snapshot not built" not in caplog.text:
            await asyncio.sleep(0.01)
        assert plane.current() is first and not woken  # the proxies keep what they have
        state.replace("Service", [service("db", "10.96.0.11")])
        while not woken:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert woken == [first.generation + 1]
    assert set(plane.current().clusters) >= {"outbound|10.96.0.11:80"}
    assert "outbound|10.96.0.10:80" not in plane.current().clusters

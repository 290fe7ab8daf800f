"""Properties of the control plane over odd-but-possible cluster state: whatever Services, EndpointSlices, Pods,
ServiceCIDRs and PeerAuthentications the watches deliver (fields missing, empty, headless, dual-stack, IPv6, FQDN
slices, finished pods, and some values only an older API version or an unvalidated CRD would carry), building the
proxies' resources never raises, gives plain JSON, and every name a resource refers to exists:

* the outbound listener's chains send to clusters that exist, and the services chain, which names its cluster
  after the connection's destination, finds one for every ClusterIP and TCP port (and every such cluster is
  reachable so);
* every EDS cluster's ``service_name`` has its ClusterLoadAssignment;
* what the proxies are sent is what Envoy accepts (ports and prefixes in range, addresses without a zone, no two
  inbound chains matching the same connections), and the capture ports reached directly stay closed.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from webhook import envoy
from webhook.injection.settings import InjectionSettings
from webhook.metrics import Metrics
from webhook.policy.mtls import Resolver
from webhook.state.catalog import PodRecord
from webhook.state.store import Store
from webhook.xds import resources
from webhook.xds.plane import LISTENER, TYPES, ControlPlane, Snapshot
from webhook.xds.settings import XdsSettings

OPTIONS = InjectionSettings().bootstrap_options()
ROOT = "istio-system"
CAPTURE_PORTS = (OPTIONS.inbound_port, OPTIONS.outbound_port, OPTIONS.admin_port)

# -- the objects ---------------------------------------------------------------------------------------------------
# Mostly what a cluster holds, with small pools so that slices name the Services, endpoints the Pods and
# PeerAuthentications select the pods (else nothing refers to anything), and now and then something odd.


def usually(typical: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``typical`` five times in six, else ``odd``."""
    return st.one_of(*[typical] * 5, odd)


ABSENT = object()  # a field left out


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value, or (less often) null or the field left out."""
    return usually(strategy, st.sampled_from([ABSENT, None]))


def _put(obj: dict[str, Any], key: str, value: Any) -> None:
    if value is not ABSENT:
        obj[key] = value


NAMESPACES = usually(st.just("shop"), st.sampled_from(["other", ROOT]))
SERVICE_NAMES = st.sampled_from(["api", "db"])
POD_NAMES = st.sampled_from(["p0", "p1", "p2"])
LABELS = st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(["api", "db"]), max_size=2)
# Pod and endpoint addresses: v4, v6 (one written twice, differently), and what Kubernetes never hands a pod.
POD_IPS = usually(st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "fd00::2"]),
                  st.sampled_from(["FD00:0::2", "10.96.0.10", "::ffff:10.0.0.1", "fe80::1%eth0", "10.0.0.256",
                                   "not-an-ip", ""]))
CLUSTER_IPS = usually(st.sampled_from(["10.96.0.10", "10.96.0.11", "fd00:96::a", "192.168.5.5"]),
                      st.sampled_from(["FD00:96:0::b", "10.0.0.1", "None", "", "10.96.0.010", "garbage",
                                       "::ffff:10.96.0.1", "fe80::a%eth0"]))
CIDRS = usually(st.sampled_from(["10.96.0.0/12", "10.96.0.0/16", "fd00:96::/108"]),
                st.sampled_from(["10.96.0.10/32", "::ffff:10.96.0.0/120", "10.96.0.1/12", "10.96.0.0/33",
                                 "fe80::%ens5/64", "garbage", ""]))
# Ports as the API server allows them, then out of range (an older or newer API version, a CRD without a schema).
PORTS = usually(st.sampled_from([80, 8080, 9090, 53, *CAPTURE_PORTS]),
                st.sampled_from([0, 65535, 65536, 70000, -1, 2**31 - 1, 2**32]))
PROTOCOLS = usually(st.just("TCP"), st.sampled_from(["UDP", "SCTP", None, "tcp"]))
PORT_NAMES = usually(st.just("http"), st.sampled_from(["grpc", "", None]))


def fields(**values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """An object with these fields, less those drawn as ABSENT."""
    return st.fixed_dictionaries(values).map(lambda obj: {k: v for k, v in obj.items() if v is not ABSENT})


def metadata(names: st.SearchStrategy[str], namespaced: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    name = usually(names.map(lambda n: {"name": n}), st.just({"generateName": "p-"}))  # not named yet
    other = fields(namespace=usually(NAMESPACES, st.just(ABSENT)) if namespaced else st.just(ABSENT),
                   labels=maybe(LABELS))
    return st.builds(lambda a, b: a | b, name, other)


SERVICE_PORTS = fields(port=PORTS, name=usually(PORT_NAMES, st.just(ABSENT)),
                       protocol=usually(PROTOCOLS, st.just(ABSENT)),
                       targetPort=maybe(st.one_of(PORTS, st.sampled_from(["http", "grpc"]))))
SERVICE_SPECS = fields(type=maybe(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"])),
                       ports=maybe(st.lists(SERVICE_PORTS, min_size=1, max_size=3)))
SERVICE_METADATA = metadata(SERVICE_NAMES)
IP_LISTS = st.lists(CLUSTER_IPS, min_size=1, max_size=2)  # dual-stack: one per family


@st.composite
def services(draw: st.DrawFn) -> dict[str, Any]:
    spec = draw(SERVICE_SPECS)
    ips = draw(IP_LISTS)
    spec["clusterIP"], spec["clusterIPs"] = ips[0], ips  # the first also alone, as the API server writes them
    if draw(st.integers(0, 3)) == 0:  # an older API server's Service has no clusterIPs; or they disagree
        _put(spec, "clusterIP", draw(maybe(CLUSTER_IPS)))
        _put(spec, "clusterIPs", draw(maybe(IP_LISTS)))
    return {"apiVersion": "v1", "kind": "Service", "metadata": draw(SERVICE_METADATA), "spec": spec}


CONDITIONS = fields(ready=usually(st.just(True), st.sampled_from([False, None, ABSENT])),
                    serving=st.sampled_from([True, False, ABSENT]), terminating=st.sampled_from([True, False, ABSENT]))
TARGET_REFS = fields(kind=usually(st.just("Pod"), st.just("Node")), name=POD_NAMES,
                     namespace=usually(st.just(ABSENT), NAMESPACES))
ENDPOINTS = fields(
    addresses=usually(st.lists(usually(POD_IPS, st.just("db.example.com")), min_size=1, max_size=2), st.just([])),
    conditions=usually(CONDITIONS, st.just(ABSENT)), targetRef=usually(TARGET_REFS, st.just(ABSENT)))
SLICE_PORTS = st.lists(fields(name=PORT_NAMES, port=usually(PORTS, st.none()), protocol=PROTOCOLS),
                       min_size=1, max_size=2)
SLICE_FIELDS = fields(addressType=usually(st.just("IPv4"), st.sampled_from(["IPv6", "FQDN"])),
                      ports=maybe(SLICE_PORTS),  # null or empty: every port
                      endpoints=maybe(st.lists(ENDPOINTS, max_size=3)))
# The label the EndpointSlice controller sets; a hand-made slice may lack it.
SLICE_LABELS = usually(SERVICE_NAMES.map(lambda name: {"kubernetes.io/service-name": name}), st.just({}))
SLICE_METADATA = metadata(st.sampled_from(["s0", "s1", "s2"]))


@st.composite
def endpoint_slices(draw: st.DrawFn) -> dict[str, Any]:
    meta = draw(SLICE_METADATA)
    meta["labels"] = {**(meta.get("labels") or {}), **draw(SLICE_LABELS)}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta, **draw(SLICE_FIELDS)}


# meshguard-init's --exclude-inbound-ports: as injected, and what no injector writes (the flag with no value too).
EXCLUDED = usually(st.sampled_from(["15021,15090", "15021,15090,8080", "8080,9090"]),
                   st.sampled_from(["", "a,b", "1,,2", "99999999999", "²", "-5", "0", ABSENT]))
INIT_ARGS = usually(EXCLUDED.map(lambda ports: ["netinit", "--exclude-inbound-ports"] +
                                 ([] if ports is ABSENT else [ports])), st.just(["netinit"]))
PROXIES = usually(st.sampled_from(["native", "classic"]), st.just("none"))  # where meshguard-proxy runs, if at all
POD_METADATA = metadata(POD_NAMES)
STATUS_ANNOTATIONS = st.sampled_from([{}, {"meshguard.io/status": "injected"}, {"meshguard.io/status": ""}])
ACCOUNTS = maybe(st.sampled_from(["api", "default", ""]))
PHASES = usually(st.just("Running"), st.sampled_from(["Pending", "Succeeded", "Failed", "Unknown", None, ABSENT]))
POD_IP_LISTS = st.lists(POD_IPS, min_size=1, max_size=2)
ODD_POD_IPS = st.lists(fields(ip=usually(POD_IPS, st.just(ABSENT))), max_size=2)


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    meta = draw(POD_METADATA)
    if annotations := draw(STATUS_ANNOTATIONS):  # the injector's mark: a claim, not the proxy
        meta["annotations"] = annotations
    spec: dict[str, Any] = {"containers": [{"name": "app"}]}
    _put(spec, "serviceAccountName", draw(ACCOUNTS))
    proxy = draw(PROXIES)
    init: list[dict[str, Any]] = []
    if proxy != "none" or draw(st.booleans()):
        init.append({"name": "meshguard-init", "args": draw(INIT_ARGS)})
    if proxy == "native":
        init.append({"name": "meshguard-proxy", "restartPolicy": "Always"})
    elif proxy == "classic":
        spec["containers"].append({"name": "meshguard-proxy"})
    if init:
        spec["initContainers"] = init
    status: dict[str, Any] = {}
    _put(status, "phase", draw(PHASES))
    ips = draw(POD_IP_LISTS)
    status["podIP"], status["podIPs"] = ips[0], [{"ip": ip} for ip in ips]
    if draw(st.integers(0, 3)) == 0:  # none before the pod is scheduled; an older API server has no podIPs
        _put(status, "podIP", draw(maybe(POD_IPS)))
        _put(status, "podIPs", draw(maybe(ODD_POD_IPS)))
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
    _put(obj, "status", status if draw(st.integers(0, 8)) else ABSENT)
    return obj


# Keys of portLevelMtls: JSON gives strings (a CRD without a schema for them, any), a YAML manifest ints.
PORT_KEYS = usually(st.sampled_from(["80", "8080", "9090"]),
                    st.one_of(st.sampled_from(["0", "65536", "99999999999", "-1", "http", " 80", "²",
                                               *map(str, CAPTURE_PORTS)]), PORTS))
MODES = usually(st.sampled_from(["STRICT", "PERMISSIVE", "DISABLE", "UNSET"]), st.sampled_from(["", None, "bogus"]))
PEER_AUTHENTICATION_SPECS = fields(
    mtls=maybe(fields(mode=usually(MODES, st.just(ABSENT)))),
    selector=maybe(fields(matchLabels=usually(st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(
        ["api", "db"]), min_size=1, max_size=2), st.sampled_from([{}, ABSENT])))),
    portLevelMtls=maybe(st.dictionaries(PORT_KEYS, usually(fields(mode=MODES), st.none()), max_size=3)))
CREATED = maybe(st.sampled_from(["2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z"]))
peer_authentications = st.builds(
    lambda meta, created, spec: {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                                 "metadata": meta | ({} if created is ABSENT else {"creationTimestamp": created}),
                                 "spec": spec},
    metadata(st.sampled_from(["pa0", "pa1", "pa2"])), CREATED, PEER_AUTHENTICATION_SPECS)
service_cidrs = st.builds(
    lambda meta, spec: {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": meta, "spec": spec},
    metadata(st.sampled_from(["kubernetes", "extra"]), namespaced=False),
    fields(cidrs=maybe(st.lists(CIDRS, max_size=2))))
namespaces = st.builds(lambda meta: {"apiVersion": "v1", "kind": "Namespace", "metadata": meta},
                       metadata(NAMESPACES, namespaced=False))

KINDS = {"Namespace": namespaces, "PeerAuthentication": peer_authentications, "ServiceCIDR": service_cidrs,
         "Service": services(), "EndpointSlice": endpoint_slices(), "Pod": pods()}
EVENTS = st.one_of(*(st.tuples(st.just(kind), st.sampled_from(["ADDED", "MODIFIED", "DELETED"]), objects)
                     for kind, objects in KINDS.items()))
BACKENDS = st.lists(st.tuples(KINDS["Pod"], ENDPOINTS), min_size=1, max_size=3)


@st.composite
def apps(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A Service, its EndpointSlice and the pods behind it, named after each other as the controllers name them
    (objects drawn alone seldom are), perhaps with a PeerAuthentication selecting the pods; the same odd field
    values as any."""
    namespace, name = draw(NAMESPACES), draw(SERVICE_NAMES)
    service = draw(KINDS["Service"]) | {"metadata": {"name": name, "namespace": namespace}}
    backends, endpoints = [], []
    for i, (pod, endpoint) in enumerate(draw(BACKENDS)):
        pod["metadata"] |= {"name": f"{name}-{i}", "namespace": namespace,
                            "labels": (pod["metadata"].get("labels") or {}) | {"app": name}}
        ips = [ip["ip"] for ip in (pod.get("status") or {}).get("podIPs") or [] if "ip" in ip]
        endpoint["addresses"] = ips[:1] or endpoint["addresses"]
        endpoint["targetRef"] = {"kind": "Pod", "name": pod["metadata"]["name"], "namespace": namespace}
        backends.append(pod)
        endpoints.append(endpoint)
    ports = [p for p in (service["spec"].get("ports") or []) if "name" in p]
    piece = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
             "metadata": {"name": f"{name}-abcde", "namespace": namespace,
                          "labels": {"kubernetes.io/service-name": name}},
             "ports": [{"name": p["name"], "port": draw(PORTS), "protocol": p.get("protocol", "TCP")} for p in ports],
             "endpoints": endpoints}
    app = [service, piece, *backends]
    if draw(st.booleans()):  # and a PeerAuthentication for its pods
        policy = draw(peer_authentications)
        policy["metadata"] = {"name": f"{name}-mtls", "namespace": namespace}
        policy["spec"]["selector"] = {"matchLabels": {"app": name}}
        app.append(policy)
    return app


LISTS = st.fixed_dictionaries({kind: st.lists(objects, max_size=3) for kind, objects in KINDS.items()})
APPS = st.lists(apps(), max_size=2)
EVENT_LISTS = st.lists(EVENTS, max_size=4)


@st.composite
def states(draw: st.DrawFn) -> tuple[dict[str, list[dict[str, Any]]], list[tuple[str, str, dict[str, Any]]]]:
    """Every kind's full list (some whole apps among them), then a few watch events."""
    listed = draw(LISTS)
    for app in draw(APPS):
        for obj in app:
            listed[obj["kind"]].append(obj)
    return listed, draw(EVENT_LISTS)


STATES = states()
RESOLVERS = st.builds(Resolver, st.just(ROOT), st.sampled_from(["STRICT", "PERMISSIVE", "DISABLE"]))

Listed = dict[str, list[dict[str, Any]]]
Events = list[tuple[str, str, dict[str, Any]]]


# -- the smallest states that break a property (found by Hypothesis, or by reading the code and checked here) ------


def app(target: int = 8080, port_modes: dict[str, str] | None = None) -> tuple[Listed, Events]:
    """Service shop/api (10.96.0.10:80) and its EndpointSlice (``target``) of one meshed pod, and with
    ``port_modes`` a PeerAuthentication selecting the pod with those portLevelMtls modes."""
    meta = {"namespace": "shop", "labels": {"app": "api"}}
    pod = {"kind": "Pod", "metadata": {"name": "api-0", **meta},
           "spec": {"containers": [{"name": "app"}, {"name": "meshguard-proxy"}]},
           "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]}}
    service = {"kind": "Service", "metadata": {"name": "api", "namespace": "shop"},
               "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}}
    piece = {"kind": "EndpointSlice",
             "metadata": {"name": "api-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "api"}},
             "ports": [{"name": "http", "port": target}],
             "endpoints": [{"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "api-0"}}]}
    policies = [] if port_modes is None else [
        {"kind": "PeerAuthentication", "metadata": {"name": "api", **meta},
         "spec": {"selector": {"matchLabels": {"app": "api"}},
                  "portLevelMtls": {port: {"mode": mode} for port, mode in port_modes.items()}}}]
    return {"Service": [service], "EndpointSlice": [piece], "Pod": [pod], "PeerAuthentication": policies}, []


STRICT = Resolver(ROOT, "STRICT")
# A portLevelMtls key str.isdigit() takes for a number and int() does not (webhook/policy/mtls.py, Resolver.modes).
SUPERSCRIPT_PORT = app(port_modes={"²": "DISABLE"})
# A port that is no uint32: protobuf refuses to pack the resource (webhook/xds/plane.py, pack).
NEGATIVE_TARGET_PORT = app(target=-1)
HUGE_PORT_KEY = app(port_modes={"99999999999": "STRICT"})
# Packed, and refused by Envoy: a port out of its range, an address with a zone (an interface the proxy may not
# have), two chains for the same connections; or taken, and a capture port forwarded.
TARGET_PORT_65536 = app(target=65536)
ZONED_SERVICE_CIDR: tuple[Listed, Events] = ({"ServiceCIDR": [
    {"kind": "ServiceCIDR", "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["fe80::%ens5/64"]}}]}, [])
PORT_KEY_0 = app(port_modes={"0": "STRICT"})
INBOUND_PORT_DISABLED = app(port_modes={str(OPTIONS.inbound_port): "DISABLE"})
ADMIN_PORT_PERMISSIVE = app(port_modes={str(OPTIONS.admin_port): "PERMISSIVE"})


def store(listed: Listed, events: Events) -> Store:
    """The state after a full list of every kind, then some watch events."""
    state = Store()
    for kind, objects in listed.items():
        state.replace(kind, objects)
    for kind, event, obj in events:
        state.apply(kind, event, obj)
    return state


# -- reading the resources -----------------------------------------------------------------------------------------


def dicts(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            yield from dicts(item)


def assert_plain_json(config: Any) -> None:
    """JSON as sent: string keys, lists not tuples, no sets, no NaN; unchanged by a round trip."""
    assert json.loads(json.dumps(config, allow_nan=False)) == config


def tcp_proxy_clusters(chain: dict[str, Any]) -> list[str]:
    return [f["typed_config"]["cluster"] for f in chain["filters"] if f["name"] == "envoy.filters.network.tcp_proxy"]


def cluster_format(chain: dict[str, Any]) -> str | None:
    """The cluster a chain's set_filter_state names from the connection (``cluster_from_destination``), if any."""
    for f in chain["filters"]:
        for state in f["typed_config"].get("on_new_connection", []):
            if state["object_key"] == "envoy.tcp_proxy.cluster":
                return str(state["format_string"]["text_format_source"]["inline_string"])
    return None


def destination(ip: str, port: int) -> str:
    """%DOWNSTREAM_LOCAL_ADDRESS% as Envoy prints it: IPv6 compressed, lower case, in brackets."""
    address = ipaddress.ip_address(ip)
    return f"{address}:{port}" if address.version == 4 else f"[{address.compressed}]:{port}"


def plain_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address a connection can have as its destination: no zone, not IPv4 written as IPv6."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and (address.scope_id or address.ipv4_mapped):
        return None
    return address


def _in(address: ipaddress.IPv4Address | ipaddress.IPv6Address, ranges: list[dict[str, Any]]) -> bool:
    return any(address in ipaddress.ip_network(f"{r['address_prefix']}/{r['prefix_len']}", strict=False)
               for r in ranges)


def _matches(predicate: dict[str, Any], address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
    single = predicate["single_predicate"]
    if "value_match" in single:
        return bool(single["value_match"]["exact"] == str(port))
    return _in(address, single["custom_match"]["typed_config"]["cidr_ranges"])


def _action(on_match: dict[str, Any], port: int) -> str:
    if "action" in on_match:
        return str(on_match["action"]["typed_config"]["value"])
    tree = on_match["matcher"]
    chosen = tree["matcher_tree"]["exact_match_map"]["map"].get(str(port))
    return _action(chosen if chosen is not None else tree["on_no_match"], port)


def route(listener: dict[str, Any], ip: str, port: int) -> str:
    """The filter chain the outbound listener's matcher picks for a connection to ``ip:port`` (first match wins)."""
    address = ipaddress.ip_address(ip)
    matcher = listener["filter_chain_matcher"]
    for rule in matcher["matcher_list"]["matchers"]:
        if _matches(rule["predicate"], address, port):
            return _action(rule["on_match"], port)
    return _action(matcher["on_no_match"], port)


def service_ranges(listener: dict[str, Any]) -> list[dict[str, Any]]:
    for rule in listener["filter_chain_matcher"]["matcher_list"]["matchers"]:
        if rule["on_match"] == envoy.chain_action(resources.SERVICES_CHAIN):
            return list(rule["predicate"]["single_predicate"]["custom_match"]["typed_config"]["cidr_ranges"])
    return []


def check_outbound(state: Store, outbound: resources.Outbound) -> None:
    """Every name the outbound listener and clusters refer to exists (or is built from the destination, and
    exists for every destination that is a Service's ClusterIP and TCP port)."""
    listener, clusters, assignments = outbound.listener, outbound.clusters, outbound.load_assignments
    for config in (listener, clusters, assignments):
        assert_plain_json(config)
    assert all(cluster["name"] == name for name, cluster in clusters.items())
    assert all(assignment["cluster_name"] == name for name, assignment in assignments.items())

    chains = {chain["name"]: chain for chain in listener["filter_chains"]}
    assert len(chains) == len(listener["filter_chains"]), "filter chain names repeat"
    targets = {str(d["action"]["typed_config"]["value"]) for d in dicts(listener["filter_chain_matcher"])
               if "action" in d}
    assert targets <= chains.keys(), f"the matcher sends to chains that do not exist: {targets - chains.keys()}"
    for chain in chains.values():
        missing = set(tcp_proxy_clusters(chain)) - clusters.keys()
        # The services chain's tcp_proxy names the blackhole: its set_filter_state overrides it per connection.
        assert not missing, f"chain {chain['name']} proxies to clusters that do not exist: {missing}"

    # The services chain: one cluster per ClusterIP and TCP port, named after the destination, and reached.
    (pattern,) = [f for f in map(cluster_format, chains.values()) if f is not None]
    reachable = set()
    for service in state.catalog.services():
        for ip in service.cluster_ips:
            if plain_ip(ip) is None:
                continue  # never a connection's destination
            for port in {p.port for p in service.ports if p.protocol == "TCP"}:
                name = pattern.replace("%DOWNSTREAM_LOCAL_ADDRESS%", destination(ip, port))
                if not 0 <= port <= 65535:  # no connection has it: a cluster for it, if any, is never used
                    reachable.add(name)
                    continue
                assert route(listener, ip, port) == resources.SERVICES_CHAIN, f"{ip}:{port} misses the services chain"
                assert name in clusters, f"{ip}:{port} of Service {service.namespace}/{service.name}: no {name}"
                reachable.add(name)
    fixed = {cluster["name"] for cluster in envoy.capture_clusters(OPTIONS)}
    assert clusters.keys() - fixed - reachable == set(), "clusters no destination can name"

    # The meshed pods: mutual TLS on their IPs, but for the ports they leave uncaptured.
    ranges = service_ranges(listener)
    claimed: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, list[PodRecord]] = {}
    for pod in state.catalog.pods():
        if pod.meshed and pod.active:
            for address in {a for ip in pod.ips if (a := plain_ip(ip)) is not None}:
                claimed.setdefault(address, []).append(pod)
    for address, (pod, *others) in claimed.items():
        if others or _in(address, ranges):
            continue  # which pod's uncaptured ports apply is not defined; a ClusterIP range goes first
        for port in {80, 8080, *(p for p in pod.plaintext_ports if 0 < p <= 65535)} - {OPTIONS.outbound_port}:
            expected = resources.PASSTHROUGH_CHAIN if port in pod.plaintext_ports else resources.MESH_CHAIN
            assert route(listener, str(address), port) == expected, f"{address}:{port} of meshed pod {pod.name}"

    # EDS: each cluster's endpoints exist; a cluster with an endpoint marked for mutual TLS can speak it.
    marked = {"filter_metadata": {resources.TLS_MATCH_KEY: resources.TLS_MATCH}}
    for cluster in clusters.values():
        if cluster.get("type") != "EDS":
            continue
        service_name = cluster["eds_cluster_config"]["service_name"]
        assert service_name in assignments, f"cluster {cluster['name']}: no assignment {service_name}"
        entries = [e for group in assignments[service_name]["endpoints"] for e in group["lb_endpoints"]]
        if any(e.get("metadata") == marked for e in entries):
            assert cluster.get("transport_socket_matches"), f"cluster {cluster['name']}: mTLS endpoints, no TLS"


@given(STATES, RESOLVERS)
@example(SUPERSCRIPT_PORT, STRICT)
@settings(max_examples=200, deadline=None)
def test_the_outbound_resources_build_for_any_state_and_refer_only_to_what_exists(
        objects: tuple[Listed, Events], resolver: Resolver) -> None:
    state = store(*objects)
    outbound = resources.outbound(state, resources.PodModes(resolver, state), OPTIONS)
    check_outbound(state, outbound)


Held = dict[tuple[str, str, str], dict[str, str]]


def serve_every_proxy(plane: ControlPlane, snapshot: Snapshot, names: frozenset[str],
                      held: Held) -> list[dict[str, Any]]:
    """What a proxy in each pod of the store is sent (any pod may run one, whatever its spec says), subscribed to
    the assignments ``names``; returns the inbound listeners. ``held``: what each proxy holds, updated; one that
    was served the previous snapshot is sent its changes (as the ADS server does), any other all it wants."""
    inbound = []
    for pod in plane.state.catalog.pods():
        for type_url in TYPES:
            wanted = plane.wanted(snapshot, type_url, pod, names)
            key = (pod.namespace, pod.name, type_url)
            incremental = key in held
            has = held.setdefault(key, {})
            response = plane.response(snapshot, type_url, pod, names, has, incremental)
            if response is not None:
                for item in response.items:
                    has[item.name] = item.version
                for name in response.removed:
                    has.pop(name, None)
            assert has == {name: item.version for name, item in wanted.items()}, f"{TYPES[type_url]} of {pod.name}"
            for name, item in wanted.items():
                config = json.loads(item.json)
                assert_plain_json(config)
                if type_url == LISTENER and name != resources.OUTBOUND_LISTENER:
                    inbound.append(config)
    return inbound


@st.composite
def histories(draw: st.DrawFn) -> tuple[tuple[Listed, Events], Events]:
    """A state, and the watch events after it: any, and the deletion of some of its objects."""
    listed, events = draw(STATES)
    later = draw(EVENT_LISTS)
    if existing := [obj for objects in listed.values() for obj in objects]:
        later += [(obj["kind"], "DELETED", obj) for obj in draw(st.lists(st.sampled_from(existing), max_size=3))]
    return (listed, events), draw(st.permutations(later))


@given(histories(), RESOLVERS)
@example((NEGATIVE_TARGET_PORT, []), STRICT)
@example((HUGE_PORT_KEY, []), STRICT)
@settings(max_examples=150, deadline=None)
def test_the_control_plane_rebuilds_and_serves_every_proxy(history: tuple[tuple[Listed, Events], Events],
                                                           resolver: Resolver) -> None:
    """A rebuild packs every resource through Envoy's protobuf schema; each proxy is then sent its clusters,
    subscribed assignments, the outbound listener and its own inbound one, first in full, then the changes."""
    objects, later = history
    state = store(*objects)
    plane = ControlPlane(state, resolver, OPTIONS, XdsSettings(), Metrics())
    state.subscribe(plane.changed)
    held: Held = {}
    first = plane.rebuild()
    names = frozenset(first.assignments) | {"outbound|80||gone.shop"}  # one it will never have
    serve_every_proxy(plane, first, names, held)
    for kind, event, obj in later:
        state.apply(kind, event, obj)
    second = plane.rebuild()
    serve_every_proxy(plane, second, names, held)
    outbound = resources.outbound(state, resources.PodModes(resolver, state), OPTIONS)
    assert second.clusters.keys() == outbound.clusters.keys()
    assert second.assignments.keys() == outbound.load_assignments.keys()


def field_problems(config: Any) -> list[str]:
    """The values in ``config`` that Envoy's validation of the resource (its protobuf rules) would reject."""
    problems = []
    for d in dicts(config):
        if "port_value" in d and not 0 <= d["port_value"] <= 65535:
            problems.append(f"port_value {d['port_value']}")
        if "destination_port" in d and not 1 <= d["destination_port"] <= 65535:
            problems.append(f"destination_port {d['destination_port']}")
        if "address_prefix" in d:  # a CidrRange
            address, _, zone = d["address_prefix"].partition("%")
            try:
                ipaddress.ip_address(address)
            except ValueError:
                problems.append(f"malformed address {d['address_prefix']}")
            if zone:  # Envoy takes it for one of the proxy's interfaces: "malformed IP address" where it has none
                problems.append(f"address with a zone {d['address_prefix']}")
            if not 0 <= d["prefix_len"] <= 128:
                problems.append(f"prefix_len {d['prefix_len']}")
    return problems


def chain_problems(listener: dict[str, Any]) -> list[str]:
    """What Envoy's listener checks would reject: two filter chains of one name, or (without a
    filter_chain_matcher, which picks chains by name) matching the same connections."""
    chains = listener["filter_chains"]
    names = [chain["name"] for chain in chains]
    problems = [f"filter chains named {n} twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if "filter_chain_matcher" not in listener:
        matches = [json.dumps(chain.get("filter_chain_match", {}), sort_keys=True) for chain in chains]
        problems += [f"filter chains matching {m}" for m in sorted({m for m in matches if matches.count(m) > 1})]
    return problems


def capture_port_leaks(inbound: dict[str, Any]) -> list[str]:
    """Inbound chains that forward a connection addressed to a capture port (reached directly, not redirected:
    it would loop through Envoy or reach the admin interface) instead of closing it."""
    return [chain["name"] for chain in inbound["filter_chains"]
            if chain.get("filter_chain_match", {}).get("destination_port") in CAPTURE_PORTS
            and tcp_proxy_clusters(chain) != [envoy.BLACKHOLE_CLUSTER]]


@given(STATES, RESOLVERS)
@example(TARGET_PORT_65536, STRICT)
@example(ZONED_SERVICE_CIDR, STRICT)
@example(PORT_KEY_0, STRICT)
@example(INBOUND_PORT_DISABLED, STRICT)
@example(ADMIN_PORT_PERMISSIVE, STRICT)
@settings(max_examples=150, deadline=None)
def test_what_the_proxies_are_sent_is_what_envoy_accepts(objects: tuple[Listed, Events], resolver: Resolver) -> None:
    state = store(*objects)
    plane = ControlPlane(state, resolver, OPTIONS, XdsSettings(), Metrics())
    snapshot = plane.rebuild()
    for kind in (snapshot.clusters, snapshot.assignments):
        for name, packed in kind.items():
            assert field_problems(json.loads(packed.json)) == [], name
    outbound = json.loads(snapshot.outbound.json)
    assert field_problems(outbound) == [], "outbound"
    assert chain_problems(outbound) == [], "outbound"
    for inbound in serve_every_proxy(plane, snapshot, frozenset(snapshot.assignments), {}):
        assert field_problems(inbound) == [], "inbound"
        assert chain_problems(inbound) == [], "inbound"
        assert capture_port_leaks(inbound) == [], "inbound"

"""What the control plane sends the proxies, as Envoy JSON: a pure function of the cluster state.

Outbound (the same for every proxy). The app's connection reaches the outbound capture listener with the address
it dialled as original destination, and the listener's matcher looks at that address first:

* a Service's ClusterIP → the cluster named after that address and port (``outbound|10.96.0.10:80``, picked by
  the chain from the connection's own destination, so the listener names no Service port: it matches the
  cluster's ServiceCIDRs, the ranges every ClusterIP comes from, and lists a ClusterIP only when no ServiceCIDR
  holds it, as on an API server before 1.33), whose endpoints come by EDS from the Service's EndpointSlices
  (``outbound|80||api.shop``). An address in those ranges with no cluster (no such Service, or one created an
  instant ago whose cluster is on its way) is closed, not passed through. An endpoint whose pod carries
  meshguard's proxy (and captures that port, and is not DISABLEd by its PeerAuthentication) is marked for mutual
  TLS, verified against the SPIFFE IDs of the Service's meshed pods; every other endpoint (an unmeshed pod, the
  API server) gets the bytes as they are. A Service whose endpoint depends on the caller (internalTrafficPolicy
  Local, sessionAffinity ClientIP) is dialled at its ClusterIP instead, so kube-proxy picks as it would without
  the proxy;
* a meshed pod's own IP (a headless Service, a StatefulSet peer) → mutual TLS to that address, any SPIFFE ID of
  the trust domain, except on the ports that pod leaves uncaptured;
* anything else → passthrough, untouched.

So the listener changes only when a meshed pod comes or goes (or a ClusterIP, without ServiceCIDRs), and then
by one address; a new Service is one new cluster.

Inbound (per proxy): :func:`webhook.envoy.inbound_listener` at the pod's modes per port
(:meth:`webhook.policy.mtls.Resolver.modes`),
from the same PeerAuthentication resolver the mTLS admission rule uses (:func:`webhook.policy.mtls.resolve`), so
what ``/validate`` reports is what the proxy does.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .. import envoy
from ..certs import spiffe_id
from ..envoy import BootstrapOptions
from ..policy.mtls import Mode, PeerAuthentications, Resolver
from ..state.catalog import POD, Catalog, PodRecord, ServiceRecord

# The endpoint metadata that selects the cluster's mTLS transport socket (Envoy's transport_socket_matches).
TLS_MATCH_KEY = "envoy.transport_socket_match"
TLS_MATCH = {"meshguard.io/tls": "mtls"}
OUTBOUND_LISTENER = "outbound"


class MeshState(PeerAuthentications, Protocol):
    """The part of the state store the control plane reads: the PeerAuthentications and the catalog."""

    catalog: Catalog


class PodModes:
    """Each pod's inbound modes from the resolver, kept until a PeerAuthentication changes (:meth:`forget`) or the
    pod does (a new record): the outbound build and every proxy's inbound listener ask for them again and again."""

    def __init__(self, resolver: Resolver, state: MeshState) -> None:
        self._resolver, self._state = resolver, state
        self._held: dict[tuple[str, str], tuple[PodRecord, tuple[Mode, dict[int, Mode]]]] = {}

    def __call__(self, pod: PodRecord) -> tuple[Mode, dict[int, Mode]]:
        key = (pod.namespace, pod.name)
        held = self._held.get(key)
        if held is not None and held[0] is pod:
            return held[1]
        modes = self._resolver.modes(self._state, pod.namespace, pod.labels)
        self._held[key] = (pod, modes)
        return modes

    def forget(self) -> None:
        self._held.clear()

    def prune(self) -> None:
        """Drop the modes of pods gone from the store (after a rebuild, which asked for every live one's)."""
        if len(self._held) > 2 * self._state.catalog.count(POD) + 16:
            self._held.clear()

    def mtls_on(self, pod: PodRecord, port: int) -> bool:
        """Whether a client should speak mutual TLS to ``pod`` on ``port``."""
        if not pod.meshed or port in pod.plaintext_ports:
            return False
        mode, ports = self(pod)
        return ports.get(port, mode) != "DISABLE"


@dataclass(frozen=True)
class Outbound:
    clusters: dict[str, dict[str, Any]]
    load_assignments: dict[str, dict[str, Any]]
    listener: dict[str, Any]


@functools.lru_cache(maxsize=1 << 16)  # a rebuild reads every pod and endpoint address again
def _parsed(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``ip`` when it is one Kubernetes gives a pod or a Service (no zone, not IPv4 mapped into IPv6, which Envoy
    prints otherwise), else None."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and (parsed.scope_id or parsed.ipv4_mapped):
        return None
    return parsed


def _address(ip: str) -> str | None:
    """``ip`` as Envoy prints it (IPv6 compressed, in brackets with a port), or None when it is not an address."""
    parsed = _parsed(ip)
    if parsed is None:
        return None
    return str(parsed) if parsed.version == 4 else f"[{parsed}]"


# The cluster of a ClusterIP and port, named from the connection's destination by the services chain.
_SERVICE_CLUSTER = "outbound|{}"


def service_cluster(address: str, port: int) -> str:
    return _SERVICE_CLUSTER.format(f"{address}:{port}")


def service_assignment(service: ServiceRecord, port: int) -> str:
    """The endpoints of a Service port, shared by the clusters of its ClusterIPs (one per IP family)."""
    return f"outbound|{port}||{service.name}.{service.namespace}"


def _tcp_ports(service: ServiceRecord) -> list[int]:
    return sorted({p.port for p in service.ports if p.protocol == "TCP"})


def _endpoints(state: MeshState, modes: PodModes, service: ServiceRecord, port: int,
               options: BootstrapOptions) -> tuple[dict[str, Any], list[str], bool]:
    """The ClusterLoadAssignment of one Service port, the SPIFFE IDs of its meshed endpoints, and whether every
    endpoint is meshed: the ready endpoints, or when none is, those terminating but still serving (kube-proxy's
    fallback, so the last pods of a Service scaled down or rolled out still answer while they drain)."""
    names = {p.name for p in service.ports if p.port == port and p.protocol == "TCP"}
    found: dict[bool, list[tuple[dict[str, Any], str | None]]] = {True: [], False: []}  # ready -> entries
    for piece in state.catalog.slices(service.namespace, service.name):
        target = next((p.port for p in piece.ports if p.name in names and p.protocol == "TCP"), None)
        if target is None:
            continue
        for endpoint in piece.endpoints:
            if not (endpoint.ready or endpoint.draining):
                continue
            pod = state.catalog.pod(service.namespace, endpoint.pod) if endpoint.pod else None
            identity = None
            if pod is not None and modes.mtls_on(pod, target):
                identity = spiffe_id(options.trust_domain, pod.namespace, pod.service_account)
            for address in endpoint.addresses:
                if _parsed(address) is None:
                    continue
                entry: dict[str, Any] = {"endpoint": {"address": envoy.socket_address(address, target)}}
                if identity is not None:
                    entry["metadata"] = {"filter_metadata": {TLS_MATCH_KEY: TLS_MATCH}}
                found[endpoint.ready].append((entry, identity))
    used = found[True] or found[False]
    name = service_assignment(service, port)
    lb_endpoints = [entry for entry, _ in used]
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}] if lb_endpoints else []}, \
        sorted({identity for _, identity in used if identity is not None}), \
        bool(used) and all(identity is not None for _, identity in used)


def _cluster(name: str, assignment: str, options: BootstrapOptions, identities: list[str]) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "alt_stat_name": assignment,  # stats by Service name, not address
        "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}, "service_name": assignment},
        "connect_timeout": envoy.CONNECT_TIMEOUT,
    }
    if identities:
        cluster["transport_socket_matches"] = [{"name": "mtls", "match": TLS_MATCH,
                                                "transport_socket": envoy.upstream_tls(options, peer_ids=identities)}]
    return cluster


def _dialled_cluster(name: str, assignment: str, options: BootstrapOptions, identities: list[str]) -> dict[str, Any]:
    """A cluster that connects to the ClusterIP as dialled, so kube-proxy picks the endpoint as it would without
    the proxy: mutual TLS when every endpoint is meshed, plaintext otherwise (what PERMISSIVE, the migration mode,
    takes from either kind)."""
    tls = envoy.upstream_tls(options, peer_ids=identities) if identities else None
    return envoy.original_dst_cluster(name, tls) | {"alt_stat_name": assignment}


def _ranges(ips: Iterable[str]) -> list[dict[str, Any]]:
    """The fewest prefixes covering exactly ``ips`` (pods of one node's range are often neighbours)."""
    addresses = sorted({a for ip in ips if (a := _parsed(ip)) is not None}, key=lambda a: (a.version, int(a)))
    ranges: list[dict[str, Any]] = []
    start = 0
    for end, address in enumerate(addresses):  # a run of consecutive addresses ends here
        if end + 1 < len(addresses) and int(addresses[end + 1]) == int(address) + 1 \
                and addresses[end + 1].version == address.version:
            continue
        first = addresses[start]
        if end == start:
            ranges.append(envoy.prefix_range(first, first.max_prefixlen))
        else:
            ranges += [envoy.prefix_range(n.network_address, n.prefixlen)
                       for n in ipaddress.summarize_address_range(first, address)]
        start = end + 1
    return ranges


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """``cidr`` when it is a network Envoy reads the same on every proxy (no zone: that names a local interface)."""
    try:
        network = ipaddress.ip_network(cidr)
    except ValueError:
        return None
    return None if isinstance(network, ipaddress.IPv6Network) and network.network_address.scope_id else network


def _service_ranges(service_cidrs: Iterable[str], cluster_ips: Iterable[str]) -> list[dict[str, Any]]:
    """The ServiceCIDRs, and any ClusterIP outside them (each on its own: a cluster without ServiceCIDRs)."""
    networks = [network for cidr in service_cidrs if (network := _network(cidr)) is not None]
    v4 = ipaddress.collapse_addresses(n for n in networks if isinstance(n, ipaddress.IPv4Network))
    v6 = ipaddress.collapse_addresses(n for n in networks if isinstance(n, ipaddress.IPv6Network))
    collapsed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [*v4, *v6]
    ranges = [envoy.prefix_range(n.network_address, n.prefixlen) for n in collapsed]
    outside = [ip for ip in cluster_ips if not any(_parsed(ip) in network for network in networks)]
    return ranges + _ranges(outside)


SERVICES_CHAIN = "outbound-services"
MESH_CHAIN = "outbound-mesh"
PASSTHROUGH_CHAIN = "outbound-passthrough"
BLACKHOLE_CHAIN = "outbound-blackhole"


def _listener(options: BootstrapOptions, service_cidrs: Iterable[str], cluster_ips: Iterable[str],
              meshed: Mapping[str, PodRecord]) -> dict[str, Any]:
    rules = []
    # A Service may use the capture port; a ClusterIP is never this pod's.
    if services := _service_ranges(service_cidrs, cluster_ips):
        rules.append((envoy.ip_predicate("services", services), envoy.chain_action(SERVICES_CHAIN)))
    # Then this port on any other address, the pod's own included (reached directly, not redirected): closed.
    rules.append((envoy.port_predicate(options.outbound_port), envoy.chain_action(BLACKHOLE_CHAIN)))
    groups: defaultdict[frozenset[int], list[str]] = defaultdict(list)
    for ip, pod in meshed.items():
        groups[pod.plaintext_ports].append(ip)
    for ports, ips in sorted(groups.items(), key=lambda group: sorted(group[0])):
        to_mesh = envoy.chain_action(MESH_CHAIN)
        if ports:  # the ports these pods leave uncaptured stay plaintext
            to_mesh = {"matcher": envoy.port_matcher({port: PASSTHROUGH_CHAIN for port in ports}, MESH_CHAIN)}
        rules.append((envoy.ip_predicate("mesh", _ranges(ips)), to_mesh))
    return envoy.capture_listener(options, OUTBOUND_LISTENER, options.outbound_port, "OUTBOUND") | {
        "listener_filters": [envoy.original_dst_filter()],
        "filter_chains": [
            envoy.blackhole_chain(BLACKHOLE_CHAIN, "outbound_blackhole"),
            {"name": SERVICES_CHAIN, "filters": envoy.cluster_from_destination(
                "outbound_services", _SERVICE_CLUSTER.format("%DOWNSTREAM_LOCAL_ADDRESS%"))},
            {"name": MESH_CHAIN, "filters": [envoy.tcp_proxy("outbound_mesh", envoy.MESH_CLUSTER)]},
            {"name": PASSTHROUGH_CHAIN,
             "filters": [envoy.tcp_proxy("outbound_passthrough", envoy.PASSTHROUGH_CLUSTER)]},
        ],
        "filter_chain_matcher": envoy.chain_matcher(rules, PASSTHROUGH_CHAIN),
    }


def outbound(state: MeshState, modes: PodModes, options: BootstrapOptions) -> Outbound:
    """Every Service port's cluster and endpoints, and the outbound listener routing to them."""
    clusters: dict[str, dict[str, Any]] = {cluster["name"]: cluster for cluster in envoy.capture_clusters(options)}
    assignments: dict[str, dict[str, Any]] = {}
    cluster_ips: list[str] = []
    for service in state.catalog.services():
        addresses = [(ip, address) for ip in service.cluster_ips if (address := _address(ip)) is not None]
        if not addresses:
            continue  # headless: its pods are reached by their own IPs
        cluster_ips += [ip for ip, _ in addresses]
        for port in _tcp_ports(service):
            name = service_assignment(service, port)
            assignment, identities, all_meshed = _endpoints(state, modes, service, port, options)
            if not service.caller_dependent:  # else the endpoint depends on the caller: kube-proxy's choice
                assignments[name] = assignment
            for _, address in addresses:
                cluster = service_cluster(address, port)
                clusters[cluster] = _dialled_cluster(cluster, name, options, identities if all_meshed else []) \
                    if service.caller_dependent else _cluster(cluster, name, options, identities)
    # Meshed pods by address: one IP each (a finished pod's IP may be reused by a live one).
    meshed: dict[str, PodRecord] = {}
    for pod in state.catalog.pods():
        if pod.meshed and pod.active:
            for ip in pod.ips:
                if _parsed(ip) is not None:
                    meshed[ip] = pod
    return Outbound(clusters, assignments, _listener(options, state.catalog.service_cidrs(), cluster_ips, meshed))

"""What the control plane sends the proxies, as Envoy JSON: a pure function of the cluster state.

Outbound (the same for every proxy). The app's connection reaches the outbound capture listener with the address
it dialled as original destination:

* a Service's ClusterIP and port → that Service port's cluster, whose endpoints come by EDS from its
  EndpointSlices. An endpoint whose pod carries meshguard's proxy (and captures that port, and is not DISABLEd by
  its PeerAuthentication) is marked for mutual TLS, verified against the SPIFFE IDs of the Service's meshed pods;
  every other endpoint (an unmeshed pod, the API server) gets the bytes as they are.
* a meshed pod's own IP (a headless Service, a StatefulSet peer) → mutual TLS to that address, any SPIFFE ID of
  the trust domain, except on the ports that pod leaves uncaptured;
* anything else → passthrough, untouched.

Envoy matches a filter chain's destination port before its address and never backtracks, so a port that any
chain names gets its own complete set of chains (its Services, the meshed pods, passthrough for the rest).

Inbound (per proxy): :func:`webhook.envoy.inbound_listener` at the pod's modes per port
(:meth:`webhook.policy.mtls.Resolver.modes`),
from the same PeerAuthentication resolver the mTLS admission rule uses (:func:`webhook.policy.mtls.resolve`), so
what ``/validate`` reports is what the proxy does.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .. import envoy
from ..certs import spiffe_id
from ..envoy import BootstrapOptions
from ..policy.mtls import PeerAuthentications, Resolver
from ..state.catalog import Catalog, PodRecord, ServiceRecord

# The endpoint metadata that selects the cluster's mTLS transport socket (Envoy's transport_socket_matches).
TLS_MATCH_KEY = "envoy.transport_socket_match"
TLS_MATCH = {"meshguard.io/tls": "mtls"}
OUTBOUND_LISTENER = "outbound"


class MeshState(PeerAuthentications, Protocol):
    """The part of the state store the control plane reads: the PeerAuthentications and the catalog."""

    catalog: Catalog


def mtls_on(resolver: Resolver, state: MeshState, pod: PodRecord, port: int) -> bool:
    """Whether a client should speak mutual TLS to ``pod`` on ``port``."""
    if not pod.meshed or port in pod.plaintext_ports:
        return False
    mode, ports = resolver.modes(state, pod.namespace, pod.labels)
    return ports.get(port, mode) != "DISABLE"


@dataclass(frozen=True)
class Outbound:
    clusters: dict[str, dict[str, Any]]
    load_assignments: dict[str, dict[str, Any]]
    listener: dict[str, Any]


def service_cluster(service: ServiceRecord, port: int) -> str:
    return f"outbound|{port}||{service.name}.{service.namespace}"


def _valid_ip(ip: str) -> bool:
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return False
    return True


def _tcp_ports(service: ServiceRecord) -> list[int]:
    return sorted({p.port for p in service.ports if p.protocol == "TCP"})


def _endpoints(state: MeshState, resolver: Resolver, service: ServiceRecord, port: int,
               options: BootstrapOptions) -> tuple[dict[str, Any], list[str]]:
    """The ClusterLoadAssignment of one Service port, and the SPIFFE IDs of its meshed endpoints."""
    names = {p.name for p in service.ports if p.port == port and p.protocol == "TCP"}
    lb_endpoints = []
    identities: set[str] = set()
    for piece in state.catalog.slices(service.namespace, service.name):
        target = next((p.port for p in piece.ports if p.name in names and p.protocol == "TCP"), None)
        if target is None:
            continue
        for endpoint in piece.endpoints:
            if not endpoint.ready:
                continue
            pod = state.catalog.pod(service.namespace, endpoint.pod) if endpoint.pod else None
            meshed = pod is not None and mtls_on(resolver, state, pod, target)
            for address in endpoint.addresses:
                if not _valid_ip(address):
                    continue
                entry: dict[str, Any] = {"endpoint": {"address": envoy.socket_address(address, target)}}
                if meshed:
                    assert pod is not None
                    entry["metadata"] = {"filter_metadata": {TLS_MATCH_KEY: TLS_MATCH}}
                    identities.add(spiffe_id(options.trust_domain, pod.namespace, pod.service_account))
                lb_endpoints.append(entry)
    name = service_cluster(service, port)
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}] if lb_endpoints else []}, \
        sorted(identities)


def _cluster(name: str, options: BootstrapOptions, identities: list[str]) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
        "connect_timeout": envoy.CONNECT_TIMEOUT,
    }
    if identities:
        cluster["transport_socket_matches"] = [{"name": "mtls", "match": TLS_MATCH,
                                                "transport_socket": envoy.upstream_tls(options, peer_ids=identities)}]
    return cluster


def _ranges(ips: Sequence[str]) -> list[dict[str, Any]]:
    """The fewest prefixes covering exactly ``ips`` (pods of one node's range are often neighbours)."""
    networks = [ipaddress.ip_network(ip) for ip in ips]
    collapsed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
        *ipaddress.collapse_addresses(n for n in networks if isinstance(n, ipaddress.IPv4Network)),
        *ipaddress.collapse_addresses(n for n in networks if isinstance(n, ipaddress.IPv6Network))]
    return [{"address_prefix": str(n.network_address), "prefix_len": n.prefixlen} for n in collapsed]


def _chain(name: str, cluster: str, port: int | None, ranges: list[dict[str, Any]]) -> dict[str, Any]:
    match: dict[str, Any] = {}
    if port is not None:
        match["destination_port"] = port
    if ranges:
        match["prefix_ranges"] = ranges
    return {"name": name, "filter_chain_match": match, "filters": [envoy.tcp_proxy(name, cluster)]}


def _host(ip: str) -> dict[str, Any]:
    return {"address_prefix": ip, "prefix_len": 128 if ":" in ip else 32}


def outbound(state: MeshState, resolver: Resolver, options: BootstrapOptions) -> Outbound:
    """Every Service port's cluster and endpoints, and the outbound listener routing to them."""
    clusters: dict[str, dict[str, Any]] = {cluster["name"]: cluster for cluster in envoy.capture_clusters(options)}
    assignments: dict[str, dict[str, Any]] = {}
    by_port: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)
    for service in state.catalog.services():
        ips = [ip for ip in service.cluster_ips if _valid_ip(ip)]
        for port in _tcp_ports(service):
            name = service_cluster(service, port)
            assignments[name], identities = _endpoints(state, resolver, service, port, options)
            clusters[name] = _cluster(name, options, identities)
            if ips:
                by_port[port].append(_chain(name, name, port, [_host(ip) for ip in ips]))
    # Meshed pods by address: one IP each (a finished pod's IP may be reused by a live one).
    meshed: dict[str, PodRecord] = {}
    for pod in state.catalog.pods():
        if pod.meshed and pod.active:
            for ip in pod.ips:
                if _valid_ip(ip):
                    meshed[ip] = pod
    for pod in meshed.values():
        for port in pod.plaintext_ports:
            by_port.setdefault(port, [])
    # Most ports leave every meshed pod captured: their ranges are computed once.
    everyone = _ranges(list(meshed))
    chains = envoy.blackhole_chains(OUTBOUND_LISTENER, (options.outbound_port,))
    for port in sorted(by_port):
        chains += by_port[port]
        captured = [ip for ip, pod in meshed.items() if port not in pod.plaintext_ports]
        ranges = everyone if len(captured) == len(meshed) else _ranges(captured)
        if ranges:
            chains.append(_chain(f"outbound-mesh-{port}", envoy.MESH_CLUSTER, port, ranges))
        chains.append(_chain(f"outbound-passthrough-{port}", envoy.PASSTHROUGH_CLUSTER, port, []))
    if everyone:
        chains.append(_chain("outbound-mesh", envoy.MESH_CLUSTER, None, everyone))
    listener = envoy.capture_listener(options, OUTBOUND_LISTENER, options.outbound_port, "OUTBOUND") | {
        "listener_filters": [envoy.original_dst_filter()],
        "filter_chains": chains,
        "default_filter_chain": {"name": "outbound-passthrough",
                                 "filters": [envoy.tcp_proxy("outbound_passthrough", envoy.PASSTHROUGH_CLUSTER)]},
    }
    return Outbound(clusters, assignments, listener)

"""The Envoy bootstrap of the ``meshguard-proxy`` sidecar: a pure function of :class:`BootstrapOptions`.

Traffic reaches Envoy through the iptables rules of ``meshguard netinit`` (see :mod:`webhook.netinit`):

* inbound TCP to any pod port is redirected to ``inbound_port``; the listener reads the original destination,
  terminates mutual TLS (the peer must present a certificate of the mesh CA whose SPIFFE ID is in the trust
  domain) and forwards the bytes to ``127.0.0.1:<original port>``. Loopback output is never captured, so the
  forwarded connection does not loop back into Envoy.
* outbound TCP from the app is redirected to ``outbound_port``; connections to ``mesh_cidrs`` leave as mutual TLS
  to the original destination (that pod's inbound listener), everything else passes through untouched. Envoy's
  own connections (netinit's ``--proxy-uid``, 1337) are not captured.

Pod identity is not known when the injected spec is built (it is built once, not per pod), so the bootstrap names
the node with ``$(POD_NAME)``-style references. By default (``injection.bootstrap: init-container``) the injector
passes the options as flags (:func:`option_args`) to ``meshguard-init``, which renders the file into a volume
shared with the proxy (:func:`write`, filling them in from its Downward API environment): the bootstrap is
kilobytes, and out of the pod object the API server no longer stores it, sends it to every watcher and to the
validating webhook for each pod. With ``inline`` it is in the proxy's ``args`` (``--config-yaml``), where the
kubelet expands them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .certs import CA_CERT, TLS_CERT, TLS_KEY
from .lists import port_number, split_list

MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")
# Filled in from the env vars the injector sets through the Downward API.
POD_VARIABLES = ("POD_NAME", "POD_NAMESPACE", "POD_IP", "SERVICE_ACCOUNT")
# The paths the readiness listener answers on: the documented one and the one the injected probes use.
READY_PATHS = ("/healthz/ready", "/ready")
STATS_PATH = "/stats/prometheus"
# The per-pod parts of an otherwise shared bootstrap (the app's rewritten probes, webhook/injection/probes.py):
# list -> the proxy's environment variable whose value (JSON objects, each followed by a comma) goes first in it.
SPLICES = {"routes": "MESHGUARD_PROBE_ROUTES", "http_filters": "MESHGUARD_PROBE_FILTERS",
           "clusters": "MESHGUARD_PROBE_CLUSTERS"}
_SPLICE_MARK = "meshguard-splice:"
_REFERENCE = re.compile(r"\$\((" + "|".join((*POD_VARIABLES, *SPLICES.values())) + r")\)")

HCM_FILTER = "envoy.filters.network.http_connection_manager"
READINESS_LISTENER = "readiness"
# Cluster names (also what Envoy's stats and access logs show).
INBOUND_CLUSTER = "inbound|local"
MESH_CLUSTER = "outbound|mesh-mtls"
PASSTHROUGH_CLUSTER = "outbound|passthrough"
ADMIN_CLUSTER = "admin"
BLACKHOLE_CLUSTER = "blackhole"
XDS_CLUSTER = "xds"

# One line per connection, with the verified peer identity (empty for plaintext and passthrough traffic).
ACCESS_LOG_FORMAT = (
    "[%START_TIME%] %DOWNSTREAM_REMOTE_ADDRESS% -> %DOWNSTREAM_LOCAL_ADDRESS% upstream=%UPSTREAM_HOST% "
    "cluster=%UPSTREAM_CLUSTER% peer=%DOWNSTREAM_PEER_URI_SAN% tls=%DOWNSTREAM_TLS_VERSION% "
    "flags=%RESPONSE_FLAGS% rx=%BYTES_RECEIVED% tx=%BYTES_SENT% ms=%DURATION%\n"
)

CONNECT_TIMEOUT = "5s"


@dataclass(frozen=True)
class BootstrapOptions:
    """Everything that shapes a sidecar's bootstrap. Hashable: the injector caches ``render`` per value."""

    inbound_port: int = 15006
    outbound_port: int = 15001
    readiness_port: int = 15021
    stats_port: int = 15090
    admin_port: int = 15000
    cert_dir: str = "/etc/meshguard/certs"  # tls.crt, tls.key, ca.crt: the pod's certificate and the mesh CA
    # Where meshguard-init writes the SDS files naming them (sds_files), so Envoy reloads them when they rotate.
    sds_dir: str = "/var/run/meshguard/sds"
    mtls_mode: str = "STRICT"  # STRICT | PERMISSIVE | DISABLE (inbound)
    # Static mode: ports whose inbound mode differs from mtls_mode, as "PORT=MODE" (a PeerAuthentication's
    # portLevelMtls, resolved at injection). With the control plane these come live instead.
    port_mtls_modes: tuple[str, ...] = ()
    mesh_cidrs: tuple[str, ...] = ()  # outbound destinations that get mTLS; other traffic passes through
    trust_domain: str = "cluster.local"
    xds_address: str | None = None  # ADS server host:port; None = static mode
    xds_tls: bool = True  # mutual TLS to the ADS server with the workload certificate
    # The capture listeners also bind [::] (netinit redirects IPv6 too). Off only for nodes without IPv6 at all
    # (kernel booted with ipv6.disable=1), where binding [::] would keep Envoy from starting.
    ipv6: bool = True

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ValueError("; ".join(problems))


def validate(options: BootstrapOptions) -> list[str]:
    """Every problem with ``options`` as a readable sentence (empty when the bootstrap can be built)."""
    problems: list[str] = []
    ports = {
        "inbound_port": options.inbound_port,
        "outbound_port": options.outbound_port,
        "readiness_port": options.readiness_port,
        "stats_port": options.stats_port,
        "admin_port": options.admin_port,
    }
    for name, port in ports.items():
        if not 1 <= port <= 65535:
            problems.append(f"{name} {port} is not a TCP port (1-65535)")
    if len(set(ports.values())) != len(ports):
        problems.append(f"the proxy ports must differ: {ports}")
    if options.mtls_mode not in MTLS_MODES:
        problems.append(f"mtls_mode {options.mtls_mode!r} is not one of {', '.join(MTLS_MODES)}")
    try:
        parse_port_modes(options.port_mtls_modes)
    except ValueError as exc:
        problems.append(str(exc))
    for cidr in options.mesh_cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            problems.append(f"mesh CIDR {cidr!r} is not an IP range such as 10.0.0.0/8")
    if not options.trust_domain or "/" in options.trust_domain:
        problems.append(f"trust_domain {options.trust_domain!r} must be a non-empty name without '/'")
    if options.xds_address is not None:
        try:
            split_host_port(options.xds_address)
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def parse_port_modes(items: Sequence[str]) -> dict[int, str]:
    """``port_mtls_modes`` items as port -> mode; ``ValueError`` for an item that is not PORT=MODE."""
    modes: dict[int, str] = {}
    for item in items:
        text, _, mode = item.partition("=")
        port = port_number(text)
        if port is None or mode not in MTLS_MODES:
            raise ValueError(f"port_mtls_modes item {item!r} is not PORT=MODE with a mode of {', '.join(MTLS_MODES)}")
        modes[port] = mode
    return modes


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into its parts."""
    host, sep, text = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = port_number(text)
    if not sep or not host or port is None:
        raise ValueError(f"xds_address {address!r} must be host:port, e.g. meshguard-xds.meshguard.svc:15010")
    return host, port


def spiffe_prefix(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}/"


def control_plane_id(trust_domain: str) -> str:
    """The SPIFFE ID of meshguard's ADS server: outside ``/ns/<namespace>/sa/<account>``, the only form a
    workload certificate takes, so no workload can present it."""
    return f"spiffe://{trust_domain}/meshguard/control-plane"


# --- building blocks -------------------------------------------------------------------------------------------


def socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def typed(type_name: str, **config: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **config}


def _file(path: str) -> dict[str, str]:
    return {"filename": path}


# The SDS secrets (and their files in sds_dir): the pod's certificate and key, and the mesh CA.
SDS_FILES = {"workload-certificate": "certificate.json", "mesh-ca": "trust-bundle.json"}
_SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def sds_files(cert_dir: str) -> dict[str, str]:
    """The SDS files' contents: each names its files in ``cert_dir`` and watches that directory, so Envoy reloads
    key and chain together when the kubelet swaps the volume's ``..data`` link (a renewed Pod Certificate or
    Secret), for new handshakes, without a restart."""
    watched = {"path": cert_dir}
    secrets = {
        "workload-certificate": {"tls_certificate": {
            "certificate_chain": _file(f"{cert_dir}/{TLS_CERT}"), "private_key": _file(f"{cert_dir}/{TLS_KEY}"),
            "watched_directory": watched}},
        "mesh-ca": {"validation_context": {"trusted_ca": _file(f"{cert_dir}/{CA_CERT}"),
                                           "watched_directory": watched}},
    }
    return {SDS_FILES[name]: json.dumps({"resources": [{"@type": _SECRET_TYPE, "name": name, **secret}]})
            for name, secret in secrets.items()}


def write_sds_files(cert_dir: str, sds_dir: Path) -> None:
    """Write :func:`sds_files` into ``sds_dir`` (they must exist when Envoy starts), readable by the proxy."""
    sds_dir.mkdir(parents=True, exist_ok=True)
    sds_dir.chmod(0o755)
    for name, text in sds_files(cert_dir).items():
        partial = sds_dir / f".{name}.partial"
        partial.write_text(text)
        partial.chmod(0o644)
        os.replace(partial, sds_dir / name)


def _sds(options: BootstrapOptions, name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {"path_config_source": {"path": f"{options.sds_dir}/{SDS_FILES[name]}"},
                                         "resource_api_version": "V3"}}


def _common_tls(options: BootstrapOptions, verify_peer: bool, peer_ids: Sequence[str] = ()) -> dict[str, Any]:
    """Our certificate, and (``verify_peer``) the mesh CA plus, for the peer, one of the SPIFFE IDs ``peer_ids``
    (any in the trust domain when there are none); both from the SDS files, so that they rotate."""
    context: dict[str, Any] = {
        # Envoy's client side stops at TLS 1.2 unless told otherwise; both sides of the mesh speak 1.3.
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificate_sds_secret_configs": [_sds(options, "workload-certificate")],
    }
    if verify_peer:
        matchers = [{"exact": peer} for peer in peer_ids] or [{"prefix": spiffe_prefix(options.trust_domain)}]
        context["combined_validation_context"] = {
            "default_validation_context": {"match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": matcher} for matcher in matchers]},
            "validation_context_sds_secret_config": _sds(options, "mesh-ca"),
        }
    else:
        context["validation_context_sds_secret_config"] = _sds(options, "mesh-ca")
    return context


def _downstream_tls(options: BootstrapOptions) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            common_tls_context=_common_tls(options, verify_peer=True),
            require_client_certificate=True,
        ),
    }


def upstream_tls(options: BootstrapOptions, verify_peer: bool = True, peer_ids: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            common_tls_context=_common_tls(options, verify_peer=verify_peer, peer_ids=peer_ids),
        ),
    }


def _access_log() -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": typed(
                "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                log_format={"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
            ),
        }
    ]


def tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": typed(
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            stat_prefix=stat_prefix,
            cluster=cluster,
        ),
    }


def blackhole_chains(name: str, ports: tuple[int, ...]) -> list[dict[str, Any]]:
    """Connections that reach a capture listener directly (not redirected: from loopback or from the network)
    have the listener's own port as original destination, and forwarding them would loop through Envoy or hand
    the admin interface to the network: send them to a cluster without endpoints, which closes them. One chain per
    port, since a chain matches a single port."""
    return [blackhole_chain(f"{name}-blackhole-{port}", f"{name}_blackhole")
            | {"filter_chain_match": {"destination_port": port}} for port in ports]


def blackhole_chain(name: str, stat_prefix: str) -> dict[str, Any]:
    return {"name": name, "filters": [tcp_proxy(stat_prefix, BLACKHOLE_CLUSTER)]}


def _set_filter_state(key: str, value_format: str) -> dict[str, Any]:
    """A network filter storing ``value_format`` (Envoy's access-log format) under a well-known filter state key."""
    return {
        "name": "envoy.filters.network.set_filter_state",
        "typed_config": typed(
            "envoy.extensions.filters.network.set_filter_state.v3.Config",
            on_new_connection=[{"object_key": key,
                                "format_string": {"text_format_source": {"inline_string": value_format}}}],
        ),
    }


def cluster_from_destination(stat_prefix: str, cluster_format: str) -> list[dict[str, Any]]:
    """Filters proxying each connection to the cluster ``cluster_format`` names from it: one filter chain for
    any number of destinations, each with its own cluster (a missing cluster closes the connection)."""
    return [_set_filter_state("envoy.tcp_proxy.cluster", cluster_format), tcp_proxy(stat_prefix, BLACKHOLE_CLUSTER)]


# --- filter chain matchers (Envoy's unified matcher API: first match wins, by address before port) --------------

_NETWORK_INPUTS = "envoy.extensions.matching.common_inputs.network.v3"


def chain_action(chain: str) -> dict[str, Any]:
    return {"action": {"name": chain, "typed_config": typed("google.protobuf.StringValue", value=chain)}}


def ip_predicate(stat_prefix: str, ranges: list[dict[str, Any]]) -> dict[str, Any]:
    """The connection's destination address is in ``ranges`` (a trie, whatever their number)."""
    return {"single_predicate": {
        "input": {"name": "destination-ip", "typed_config": typed(f"{_NETWORK_INPUTS}.DestinationIPInput")},
        "custom_match": {"name": "ip", "typed_config": typed("envoy.extensions.matching.input_matchers.ip.v3.Ip",
                                                             cidr_ranges=ranges, stat_prefix=stat_prefix)},
    }}


def _port_input() -> dict[str, Any]:
    return {"name": "destination-port", "typed_config": typed(f"{_NETWORK_INPUTS}.DestinationPortInput")}


def port_predicate(port: int) -> dict[str, Any]:
    return {"single_predicate": {"input": _port_input(), "value_match": {"exact": str(port)}}}


def port_matcher(chains: Mapping[int, str], otherwise: str) -> dict[str, Any]:
    """The chain of the connection's destination port, ``otherwise`` for other ports."""
    return {"matcher_tree": {"input": _port_input(),
                             "exact_match_map": {"map": {str(port): chain_action(chain)
                                                         for port, chain in sorted(chains.items())}}},
            "on_no_match": chain_action(otherwise)}


def chain_matcher(rules: Sequence[tuple[dict[str, Any], dict[str, Any]]], otherwise: str) -> dict[str, Any]:
    """A listener's ``filter_chain_matcher``: the first (predicate, on_match) that matches, else ``otherwise``."""
    return {"matcher_list": {"matchers": [{"predicate": predicate, "on_match": on_match}
                                          for predicate, on_match in rules]},
            "on_no_match": chain_action(otherwise)}


def original_dst_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.listener.original_dst",
        "typed_config": typed("envoy.extensions.filters.listener.original_dst.v3.OriginalDst"),
    }


def _tls_inspector() -> dict[str, Any]:
    return {
        "name": "envoy.filters.listener.tls_inspector",
        "typed_config": typed("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"),
    }


def capture_listener(options: BootstrapOptions, name: str, port: int, direction: str) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "name": name,
        "address": socket_address("0.0.0.0", port),
        "traffic_direction": direction,
        # One access log for the listener, not one per filter chain's tcp_proxy: it sees the same connection
        # (tcp_proxy fills in the upstream host and cluster), and the bootstrap travels in every injected pod's spec
        # (sizes: docs/benchmarks.md#speed-tricks).
        "access_log": _access_log(),
    }
    if options.ipv6:
        listener["additional_addresses"] = [{"address": socket_address("::", port)}]
    return listener


# --- listeners -------------------------------------------------------------------------------------------------


def inbound_listener(options: BootstrapOptions, mode: str | None = None,
                     port_modes: Mapping[int, str] | None = None) -> dict[str, Any]:
    """Port ``inbound_port``: mTLS in, plaintext to ``127.0.0.1:<original port>``.

    ``mode`` (default ``options.mtls_mode``) applies to every port but those of ``port_modes`` (default
    ``options.port_mtls_modes``), the resolved PeerAuthentication modes: STRICT takes only mutual TLS,
    PERMISSIVE also plaintext, DISABLE forwards whatever arrives. The original port is handed to the ORIGINAL_DST
    cluster through the well-known filter state key, so one listener serves every application port without knowing
    them in advance.
    """
    closed = (options.inbound_port, options.outbound_port, options.admin_port)
    chains = blackhole_chains("inbound", closed)
    if port_modes is None:
        port_modes = parse_port_modes(options.port_mtls_modes)
    for port, port_mode in sorted(port_modes.items()):
        if port not in closed:  # a mode for the proxy's own ports would open them to the network
            chains += _inbound_chains(options, port_mode, port)
    chains += _inbound_chains(options, mode or options.mtls_mode, None)
    return capture_listener(options, "inbound", options.inbound_port, "INBOUND") | {
        "listener_filters": [original_dst_filter(), _tls_inspector()],
        # Clients of server-first protocols (SMTP, MySQL) send nothing until the server speaks: after 1s, plaintext.
        "listener_filters_timeout": "1s",
        "continue_on_listener_filters_timeout": True,
        "filter_chains": chains,
    }


def _inbound_chains(options: BootstrapOptions, mode: str, port: int | None) -> list[dict[str, Any]]:
    to_local_app = [
        _set_filter_state("envoy.network.transport_socket.original_dst_address", "127.0.0.1:%DOWNSTREAM_LOCAL_PORT%"),
        tcp_proxy("inbound", INBOUND_CLUSTER),
    ]
    suffix = "" if port is None else f"-{port}"
    on_port: dict[str, Any] = {} if port is None else {"destination_port": port}
    if mode == "DISABLE":
        chain: dict[str, Any] = {"name": f"inbound-plaintext{suffix}", "filters": to_local_app}
        if on_port:
            chain["filter_chain_match"] = on_port
        return [chain]
    chains: list[dict[str, Any]] = [
        {"name": f"inbound-mtls{suffix}", "filter_chain_match": {**on_port, "transport_protocol": "tls"},
         "transport_socket": _downstream_tls(options), "filters": to_local_app}]
    if mode == "PERMISSIVE":
        chains.append({"name": f"inbound-plaintext{suffix}",
                       "filter_chain_match": {**on_port, "transport_protocol": "raw_buffer"}, "filters": to_local_app})
    return chains


def outbound_listener(options: BootstrapOptions) -> dict[str, Any]:
    """Port ``outbound_port``: mTLS to ``mesh_cidrs``, untouched TCP to everything else."""
    # Only our own port: other ports of other hosts, even 15006, are ordinary destinations.
    chains = blackhole_chains("outbound", (options.outbound_port,))
    if options.mesh_cidrs:
        chains.append(
            {
                "name": "outbound-mesh",
                "filter_chain_match": {"prefix_ranges": [cidr_range(c) for c in options.mesh_cidrs]},
                "filters": [tcp_proxy("outbound_mesh", MESH_CLUSTER)],
            }
        )
    return capture_listener(options, "outbound", options.outbound_port, "OUTBOUND") | {
        "listener_filters": [original_dst_filter()],
        "filter_chains": chains,
        "default_filter_chain": {
            "name": "outbound-passthrough",
            "filters": [tcp_proxy("outbound_passthrough", PASSTHROUGH_CLUSTER)],
        },
    }


def cidr_range(cidr: str) -> dict[str, Any]:
    network = ipaddress.ip_network(cidr, strict=False)
    return prefix_range(network.network_address, network.prefixlen)


def prefix_range(address: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix_len: int) -> dict[str, Any]:
    """Envoy's CidrRange."""
    return {"address_prefix": str(address), "prefix_len": prefix_len}


def _admin_route_listener(name: str, port: int, paths: dict[str, str]) -> dict[str, Any]:
    """An HTTP listener on all addresses exposing only ``paths`` (public path -> admin path) of the admin API."""
    routes = [
        {"match": {"path": public}, "route": {"cluster": ADMIN_CLUSTER, "prefix_rewrite": admin}}
        for public, admin in paths.items()
    ]
    return {
        "name": name,
        "address": socket_address("0.0.0.0", port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": HCM_FILTER,
                        "typed_config": typed(
                            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            stat_prefix=name,
                            route_config={
                                "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]
                            },
                            http_filters=[
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": typed("envoy.extensions.filters.http.router.v3.Router"),
                                }
                            ],
                        ),
                    }
                ]
            }
        ],
    }


def readiness_listener(options: BootstrapOptions) -> dict[str, Any]:
    return _admin_route_listener(READINESS_LISTENER, options.readiness_port, dict.fromkeys(READY_PATHS, "/ready"))


def tcp_connect_check(period: int, timeout: int) -> dict[str, Any]:
    """An active health check that only connects, every ``period`` seconds whether or not traffic flows."""
    return {"timeout": f"{timeout}s", "interval": f"{period}s", "no_traffic_interval": f"{period}s",
            "unhealthy_threshold": 1, "healthy_threshold": 1, "tcp_health_check": {}}


def grpc_health_check(period: int, timeout: int, service: str) -> dict[str, Any]:
    """An active gRPC health check (``grpc.health.v1.Health/Check`` of ``service``), every ``period`` seconds: the
    host is healthy while the answer is SERVING. Its cluster must speak HTTP/2 (:func:`http2`)."""
    check = {**tcp_connect_check(period, timeout), "grpc_health_check": {"service_name": service} if service else {}}
    del check["tcp_health_check"]
    return check


def http2() -> dict[str, Any]:
    """A cluster's protocol options for gRPC: HTTP/2 to the upstream."""
    http_options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    return {http_options: typed(http_options, explicit_http_config={"http2_protocol_options": {}})}


def cluster_health_filter(path: str, cluster: str) -> dict[str, Any]:
    """Answers ``GET path`` itself: 200 while ``cluster``'s host passes its health check, else 503."""
    return {"name": "envoy.filters.http.health_check", "typed_config": typed(
        "envoy.extensions.filters.http.health_check.v3.HealthCheck", pass_through_mode=False,
        headers=[{"name": ":path", "string_match": {"exact": path}}],
        cluster_min_healthy_percentages={cluster: {"value": 100}})}


def local_cluster(name: str, port: int) -> dict[str, Any]:
    return _static_cluster(name, "127.0.0.1", port)


def unverified_tls() -> dict[str, Any]:
    return {"name": "envoy.transport_sockets.tls",
            "typed_config": typed("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext")}


def stats_listener(options: BootstrapOptions) -> dict[str, Any]:
    return _admin_route_listener("prometheus", options.stats_port, {STATS_PATH: STATS_PATH})


# --- clusters --------------------------------------------------------------------------------------------------


def original_dst_cluster(name: str, transport_socket: dict[str, Any] | None = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": CONNECT_TIMEOUT,
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    return cluster


def _static_cluster(name: str, host: str, port: int, kind: str = "STATIC") -> dict[str, Any]:
    """A cluster of one endpoint; Envoy's defaults (type STATIC, a 5 s connect timeout) left out, as this travels in
    every injected pod's spec (the probe clusters)."""
    return {
        "name": name,
        **({} if kind == "STATIC" else {"type": kind}),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(host, port)}}]}],
        },
    }


def capture_clusters(options: BootstrapOptions) -> list[dict[str, Any]]:
    """The clusters behind the capture listeners: the local app, mTLS to a mesh pod, passthrough, and nowhere."""
    return [
        original_dst_cluster(INBOUND_CLUSTER),
        original_dst_cluster(MESH_CLUSTER, upstream_tls(options)),
        original_dst_cluster(PASSTHROUGH_CLUSTER),
        {"name": BLACKHOLE_CLUSTER, "type": "STATIC", "connect_timeout": CONNECT_TIMEOUT},
    ]


def xds_cluster(options: BootstrapOptions) -> dict[str, Any]:
    assert options.xds_address is not None
    host, port = split_host_port(options.xds_address)
    try:
        ipaddress.ip_address(host)
        kind = "STATIC"
    except ValueError:
        kind = "STRICT_DNS"
    cluster = _static_cluster(XDS_CLUSTER, host, port, kind)
    cluster["typed_extension_protocol_options"] = http2()  # ADS is gRPC
    if options.xds_tls:
        cluster["transport_socket"] = upstream_tls(options, peer_ids=(control_plane_id(options.trust_domain),))
    return cluster


# --- the bootstrap ---------------------------------------------------------------------------------------------


def _node() -> dict[str, Any]:
    return {
        "id": "sidecar~$(POD_IP)~$(POD_NAME).$(POD_NAMESPACE)",
        "cluster": "$(SERVICE_ACCOUNT).$(POD_NAMESPACE)",
        "metadata": {
            "namespace": "$(POD_NAMESPACE)",
            "pod_name": "$(POD_NAME)",
            "service_account": "$(SERVICE_ACCOUNT)",
        },
    }


def bootstrap(options: BootstrapOptions) -> dict[str, Any]:
    """The bootstrap as a dict. Static mode: the whole data plane. xDS mode: the health and stats listeners plus
    an ADS cluster; the control plane delivers the inbound/outbound listeners and mesh clusters."""
    listeners = [readiness_listener(options), stats_listener(options)]
    clusters = [_static_cluster(ADMIN_CLUSTER, "127.0.0.1", options.admin_port)]
    config: dict[str, Any] = {
        "node": _node(),
        "admin": {"address": socket_address("127.0.0.1", options.admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    if options.xds_address is None:
        listeners[:0] = [inbound_listener(options), outbound_listener(options)]
        clusters += capture_clusters(options)
    else:
        clusters.append(xds_cluster(options))
        # No initial fetch timeout: the proxy is not ready (nor, with a native sidecar, the app started) until the
        # control plane has sent its listeners; without them every captured connection would be refused.
        ads = {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "0s"}
        config["dynamic_resources"] = {
            "ads_config": {
                "api_type": "DELTA_GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads,
            "lds_config": ads,
        }
    return config


def _mark_splices(config: dict[str, Any]) -> None:
    (readiness,) = [x for x in config["static_resources"]["listeners"] if x["name"] == READINESS_LISTENER]
    manager = readiness["filter_chains"][0]["filters"][0]["typed_config"]
    for key, items in (("routes", manager["route_config"]["virtual_hosts"][0]["routes"]),
                       ("http_filters", manager["http_filters"]), ("clusters", config["static_resources"]["clusters"])):
        items.insert(0, _SPLICE_MARK + SPLICES[key])


def render(options: BootstrapOptions) -> str:
    """Compact JSON (valid YAML) for ``envoy --config-yaml``, with ``$(VAR)`` splice points (:data:`SPLICES`)."""
    config = bootstrap(options)
    _mark_splices(config)
    rendered = json.dumps(config, separators=(",", ":"))
    for variable in SPLICES.values():
        rendered = rendered.replace(f'"{_SPLICE_MARK}{variable}",', f"$({variable})")
    return rendered


def expand_pod_variables(rendered: str, values: Mapping[str, str]) -> str:
    """Replace the ``$(VAR)`` references of a rendered bootstrap with the pod's values (JSON-escaped), and its
    splice points with the JSON fragments the injector set (empty when a variable is absent), in one pass, as the
    kubelet does: a value is never expanded again (a probe path may contain ``$(...)``)."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in POD_VARIABLES:
            return json.dumps(values[name])[1:-1]
        return values.get(name, "")

    return _REFERENCE.sub(value, rendered)


def write(options: BootstrapOptions, path: Path, environ: Mapping[str, str]) -> None:
    """Render the bootstrap for the pod described by ``environ`` (:data:`POD_VARIABLES`) into ``path``.

    The file appears whole or not at all (written aside, then renamed), readable by the proxy's user. Raises
    ``ValueError`` when a variable is missing and ``OSError`` when the file cannot be written.
    """
    missing = [name for name in POD_VARIABLES if name not in environ]
    if missing:
        raise ValueError(f"the environment lacks {', '.join(missing)}; the injector sets them from the Downward API")
    text = expand_pod_variables(render(options), environ)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.chmod(0o644)
    os.replace(partial, path)


# --- options as command-line flags -----------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# The fields that shape only a static bootstrap: with an xds_address the control plane sends what they would.
STATIC_ONLY = frozenset({"mtls_mode", "port_mtls_modes", "mesh_cidrs"})


def option_args(options: BootstrapOptions, skip: Collection[str] = ()) -> list[str]:
    """Flags for :func:`add_option_arguments` that rebuild the bootstrap of ``options`` (but the fields in
    ``skip``). Every field that shapes it is written, so what the sidecar gets never depends on the defaults of
    the init image's version."""
    args: list[str] = []
    unused = STATIC_ONLY if options.xds_address is not None else frozenset()
    for spec in fields(options):
        value = getattr(options, spec.name)
        if value is None or spec.name in skip or spec.name in unused:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = ",".join(value)
        else:
            text = str(value)
        args += [_flag(spec.name), text]
    return args


def _boolean(text: str) -> bool:
    if text not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text == "true"


def _items(text: str) -> tuple[str, ...]:
    return tuple(split_list(text))


def add_option_arguments(parser: argparse.ArgumentParser, skip: Collection[str] = ()) -> None:
    """One flag per :class:`BootstrapOptions` field (but those in ``skip``, which the parser defines its own way),
    defaulting to the field's default."""
    defaults = BootstrapOptions()
    for spec in fields(BootstrapOptions):
        if spec.name in skip:
            continue
        default = getattr(defaults, spec.name)
        kind: Any = {bool: _boolean, tuple: _items, int: int}.get(type(default), str)
        parser.add_argument(_flag(spec.name), dest=spec.name, type=kind, default=default,
                            metavar=spec.name.upper())


def options_from(args: argparse.Namespace) -> BootstrapOptions:
    """The options parsed by :func:`add_option_arguments`; ``ValueError`` names every invalid one."""
    return BootstrapOptions(**{spec.name: getattr(args, spec.name) for spec in fields(BootstrapOptions)})

"""The ADS server: one gRPC stream per proxy, state of the world per type (CDS, EDS, LDS), over mutual TLS.

Protocol, as Envoy's xDS spec has it: every response carries a version and a nonce (listeners and clusters
whole, endpoints only those that changed for this proxy); the proxy's next request of
that type echoes the nonce and either the new version (ACK) or its last good version with an ``error_detail``
(NACK). A NACKed config is logged and counted, and not sent again; the proxy keeps running its last good one until
the cluster changes. A request whose nonce is not the latest one sent is stale and ignored.

Who is asking: the proxy's node metadata names its pod; over mutual TLS the client certificate's SPIFFE ID must
be that pod's namespace and ServiceAccount, so a workload cannot ask for another's config. A pod the store has
not seen yet (its watch event is still on the way) gets nothing until it appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from .. import envoy
from ..certs import Issued, issue_leaf, service_dns_names, spiffe_id
from ..identity.authority import Authority
from ..metrics import Metrics
from ..state.catalog import PodRecord
from .plane import ENDPOINTS, TYPES, ControlPlane, Packed, Snapshot
from .settings import XdsSettings

log = logging.getLogger("meshguard.xds")

SERVER_CERT_DAYS = 365
SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


@dataclass
class _Sent:
    version: str = ""
    nonce: str = ""
    names: frozenset[str] = frozenset()
    changed_at: float | None = None  # the change the unacknowledged response carries


@dataclass
class Proxy:
    """One connected proxy, as the debug endpoint shows it."""

    node_id: str
    namespace: str
    pod: str
    connected_at: float = field(default_factory=time.time)
    sent: dict[str, _Sent] = field(default_factory=dict)  # type -> the last response sent
    acked: dict[str, str] = field(default_factory=dict)
    resources: dict[str, dict[str, Packed]] = field(default_factory=dict)  # type name -> what it holds
    # The snapshot whose assignments (for the names it asked) the proxy holds: later ones send only changes.
    endpoints_from: int | None = None


def _metadata(node: Any) -> dict[str, str]:
    fields = node.metadata.fields
    return {key: fields[key].string_value for key in ("namespace", "pod_name", "service_account") if key in fields}


def _peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The URI SAN of the client certificate, or None without TLS."""
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    if not pem:
        return None
    cert = x509.load_pem_x509_certificate(pem[0])
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else ""


class AggregatedDiscovery(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, plane: ControlPlane, metrics: Metrics, trust_domain: str, tls: bool) -> None:
        self._plane = plane
        self._metrics = metrics
        self.trust_domain = trust_domain
        self._tls = tls
        self._nonces = itertools.count(1)
        self.proxies: dict[int, Proxy] = {}

    async def StreamAggregatedResources(  # noqa: N802 - the generated servicer's name
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await requests.put(request)
            finally:
                await requests.put(None)

        reader = asyncio.create_task(read())
        first = await requests.get()
        if first is None:
            return
        meta = _metadata(first.node)
        proxy = Proxy(first.node.id, meta.get("namespace", ""), meta.get("pod_name", ""))
        peer = _peer_identity(context) if self._tls else None
        self.proxies[id(proxy)] = proxy
        self._metrics.xds_connected.inc()
        log.info("proxy connected", extra={"proxy": proxy.node_id, "peer": peer or ""})
        subscribed: dict[str, frozenset[str]] = {}
        pending: list[discovery_pb2.DiscoveryRequest] = [first]
        generation = 0
        try:
            while True:
                for request in pending:
                    self._take(proxy, request, subscribed)
                pending = []
                snapshot = self._plane.current()
                try:
                    pod = self._authorized(proxy, peer)
                except _Refused as exc:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
                if pod is not None:
                    for response in self._responses(proxy, pod, snapshot, subscribed):
                        yield response
                generation = snapshot.generation
                request_wait = asyncio.ensure_future(requests.get())
                change_wait = asyncio.ensure_future(self._plane.wait_for_change(generation))
                done, _ = await asyncio.wait({request_wait, change_wait}, return_when=asyncio.FIRST_COMPLETED)
                change_wait.cancel()
                if request_wait in done:
                    request = request_wait.result()
                    if request is None:
                        return
                    pending.append(request)
                else:
                    request_wait.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await request_wait
        finally:
            reader.cancel()
            self.proxies.pop(id(proxy), None)
            self._metrics.xds_connected.dec()
            log.info("proxy disconnected", extra={"proxy": proxy.node_id})

    def _authorized(self, proxy: Proxy, peer: str | None) -> PodRecord | None:
        """The proxy's pod once the store knows it; with TLS, only if the certificate is that pod's identity."""
        pod = self._plane.state.catalog.pod(proxy.namespace, proxy.pod)
        if pod is None:
            return None
        if peer is not None and peer != spiffe_id(self.trust_domain, pod.namespace, pod.service_account):
            log.warning("proxy refused: its certificate is not its pod's identity",
                        extra={"proxy": proxy.node_id, "peer": peer})
            raise _Refused(f"certificate {peer!r} is not the identity of pod {proxy.namespace}/{proxy.pod}")
        return pod

    def _take(self, proxy: Proxy, request: discovery_pb2.DiscoveryRequest,
              subscribed: dict[str, frozenset[str]]) -> None:
        type_url = request.type_url
        if type_url not in TYPES:
            return
        name = TYPES[type_url]
        sent = proxy.sent.get(type_url)
        if request.response_nonce and (sent is None or request.response_nonce != sent.nonce):
            return  # stale: a newer response is on its way
        if request.HasField("error_detail"):
            self._metrics.xds_nacks.labels(name).inc()
            log.warning("proxy rejected its config; it keeps its last good one",
                        extra={"proxy": proxy.node_id, "type": name, "version": request.version_info,
                               "error": request.error_detail.message[:500]})
        elif sent is not None and request.response_nonce:
            proxy.acked[name] = request.version_info
            if sent.changed_at is not None:
                self._metrics.xds_convergence.labels(name).observe(time.monotonic() - sent.changed_at)
                sent.changed_at = None
        subscribed[type_url] = frozenset(request.resource_names)

    def _responses(self, proxy: Proxy, pod: PodRecord, snapshot: Snapshot,
                   subscribed: dict[str, frozenset[str]]) -> list[bytes]:
        responses = []
        for type_url, name in TYPES.items():
            if type_url not in subscribed:
                continue
            names = subscribed[type_url]
            sent = proxy.sent.get(type_url)
            renamed = sent is None or sent.names != names
            response = self._plane.response(snapshot, type_url, pod, names,
                                            None if renamed else proxy.endpoints_from)
            if type_url == ENDPOINTS:
                proxy.endpoints_from = snapshot.generation
            if not renamed and sent is not None and sent.version == response.version:
                continue
            nonce = str(next(self._nonces))
            proxy.sent[type_url] = _Sent(response.version, nonce, names, snapshot.changed_at)
            held = {} if type_url != ENDPOINTS or renamed else proxy.resources.get(name, {})
            proxy.resources[name] = {**held, **{item.name: item for item in response.items}}
            responses.append(response.body + discovery_pb2.DiscoveryResponse(nonce=nonce).SerializeToString())
            self._metrics.xds_pushes.labels(name).inc()
        return responses

    def describe(self, namespace: str, pod: str) -> dict[str, Any] | None:
        """What the proxy of ``namespace/pod`` was last sent, for ``meshguard proxy-config``."""
        for proxy in self.proxies.values():
            if (proxy.namespace, proxy.pod) == (namespace, pod):
                return {
                    "node": proxy.node_id,
                    "connected_at": proxy.connected_at,
                    "versions": {TYPES[t]: {"sent": s.version, "acked": proxy.acked.get(TYPES[t], "")}
                                 for t, s in proxy.sent.items()},
                    "resources": {name: [item.json for item in items.values()]
                                  for name, items in proxy.resources.items()},
                }
        return None


class _Refused(Exception):
    """The proxy's certificate does not match the pod it claims to be."""


def server_certificate(ca: Issued, service: str, namespace: str, trust_domain: str) -> Issued:
    """The ADS server's certificate from the mesh CA, with the control plane's SPIFFE ID, which the proxies
    require (and a client certificate from the same CA is what each proxy presents)."""
    return issue_leaf(ca, f"{service}.{namespace}.svc", dns_names=service_dns_names(service, namespace),
                      uris=(envoy.control_plane_id(trust_domain),), days=SERVER_CERT_DAYS)


def _credentials(current: Callable[[], Authority], service: str, namespace: str,
                 trust_domain: str) -> grpc.ServerCredentials:
    """Mutual TLS with the mesh CA as it is now: a new handshake after a rotation step gets a certificate from the
    CA that signs and trusts the new bundle; a certificate past half-life is replaced the same way."""
    held: dict[str, Any] = {}

    def configuration() -> grpc.ServerCertificateConfiguration | None:
        authority, now = current(), dt.datetime.now(dt.UTC)
        key = (authority.signing.cert, authority.bundle_pem())
        leaf = held.get("leaf")
        if held.get("key") == key and leaf is not None and now < leaf.cert.not_valid_after_utc - \
                dt.timedelta(days=SERVER_CERT_DAYS / 2):
            return None  # keep serving the one in use
        leaf = server_certificate(authority.signing, service, namespace, trust_domain)
        held.update(key=key, leaf=leaf)
        return grpc.ssl_server_certificate_configuration([(leaf.key_pem(), leaf.cert_pem())], key[1])

    initial = configuration()
    return grpc.dynamic_ssl_server_credentials(initial, configuration, require_client_authentication=True)


async def serve(servicer: AggregatedDiscovery, settings: XdsSettings, ca: Callable[[], Authority] | None,
                service: str, namespace: str) -> None:
    """Serve until cancelled: mutual TLS with the mesh CA when meshguard holds it, else plaintext."""
    server = grpc.aio.server(options=[("grpc.keepalive_time_ms", 30_000), ("grpc.http2.max_pings_without_data", 0)])
    # Registered by hand, not with the generated helper, to send the responses' bytes as they are: each one is
    # serialized once per snapshot for every proxy that gets it.
    method = grpc.stream_stream_rpc_method_handler(
        servicer.StreamAggregatedResources, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
        response_serializer=bytes)
    handler = grpc.method_handlers_generic_handler(SERVICE, {"StreamAggregatedResources": method})
    server.add_generic_rpc_handlers((handler,))
    address = f"{settings.host}:{settings.port}"
    if ca is not None:
        server.add_secure_port(address, _credentials(ca, service, namespace, servicer.trust_domain))
    else:
        server.add_insecure_port(address)
    await server.start()
    log.info("xds server listening", extra={"address": address, "tls": ca is not None})
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(grace=2)

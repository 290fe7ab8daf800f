"""The ADS server: one gRPC stream per proxy, delta xDS per type (CDS, EDS, LDS), over mutual TLS.

Protocol, as Envoy's incremental xDS spec has it: a response carries the resources that are new or changed for
the proxy (each with its version) and the names it should drop, and a nonce; the proxy's next request of that
type echoes the nonce, with an ``error_detail`` if it rejected them (NACK). Clusters and listeners are sent to
every proxy (wildcard); endpoints for the names it subscribes to. A reconnecting proxy announces the versions it
holds, and only what differs is sent. Each response is answered on its own; a NACKed one is logged and counted,
and its resources are not sent again until the cluster changes; the proxy keeps running its last good config. A
request whose nonce awaits no answer (already answered, or forgotten) is stale: its ACK or NACK is ignored, its
subscription changes are not.

Who is asking: the proxy's node metadata names its pod; over mutual TLS the client certificate's SPIFFE ID must
be that pod's namespace and ServiceAccount, so a workload cannot ask for another's config. A pod the store has
not seen yet (its watch event is still on the way) gets nothing until it appears.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
from cryptography import x509
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from .. import envoy
from ..certs import Issued, issue_leaf, service_dns_names, spiffe_id
from ..identity.authority import Authority
from ..metrics import Metrics
from ..state.catalog import PodRecord
from .plane import ENDPOINTS, TYPES, ControlPlane, Held, Snapshot
from .settings import XdsSettings

log = logging.getLogger("meshguard.xds")

SERVER_CERT_DAYS = 365
UNANSWERED_KEPT = 16  # responses per type a proxy may leave unanswered before the oldest are forgotten
# What a proxy may subscribe to: names of endpoint resources ("outbound|PORT||NAME.NAMESPACE") are far shorter; a
# proxy subscribes to those its clusters name, so twice the number there are (or this floor) is never reached
# by one, and bounds what a stream of requests written by hand can make the server hold and compare.
MAX_NAME_LENGTH = 256
MIN_SUBSCRIPTION_LIMIT = 1024
_CHANGED = object()  # in a stream's inbox: a new snapshot waits
SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


@dataclass
class _Subscription:
    """One type on one stream."""

    names: frozenset[str] = frozenset()  # endpoints: the names subscribed; clusters and listeners: all
    held: Held = field(default_factory=dict)  # name -> version the proxy has (it announced, or was sent)
    synced: int | None = None  # the snapshot whose resources ``held`` is, for these names
    # Responses not answered yet: nonce -> (the names they carry, the change they carry, for convergence).
    unanswered: dict[str, tuple[frozenset[str], float | None]] = field(default_factory=dict)
    sent_nonce: str = ""
    acked: str = ""
    rejected: bool = False  # some of ``held`` was NACKed: compare in full at the next snapshot


@dataclass
class Proxy:
    """One connected proxy, as the debug endpoint shows it."""

    node_id: str
    namespace: str
    pod: str
    connected_at: float = field(default_factory=time.time)
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)  # type URL -> its subscription


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
        self._subscriptions: dict[frozenset[str], frozenset[str]] = {}

    async def DeltaAggregatedResources(  # noqa: N802 - the generated servicer's name
        self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        # The proxy's requests (None when it hangs up) and one CHANGED while a new snapshot waits to be sent.
        inbox: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest | object | None] = asyncio.Queue()
        waiting = False

        def wake() -> None:
            nonlocal waiting
            if not waiting:  # a proxy that does not read holds one marker, not every snapshot since
                waiting = True
                inbox.put_nowait(_CHANGED)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    inbox.put_nowait(request)
            finally:
                inbox.put_nowait(None)

        reader = asyncio.create_task(read())
        proxy: Proxy | None = None
        try:
            first = await inbox.get()
            if not isinstance(first, discovery_pb2.DeltaDiscoveryRequest):
                return
            meta = _metadata(first.node)
            proxy = Proxy(first.node.id, meta.get("namespace", ""), meta.get("pod_name", ""))
            peer = _peer_identity(context) if self._tls else None
            self.proxies[id(proxy)] = proxy
            self._plane.follow(wake)
            self._metrics.xds_connected.inc()
            log.info("proxy connected", extra={"proxy": proxy.node_id, "peer": peer or ""})
            pending = [first]
            while True:
                snapshot = self._plane.current()
                try:
                    for request in pending:
                        self._take(proxy, request, max(MIN_SUBSCRIPTION_LIMIT, 2 * len(snapshot.assignments)))
                    pod = self._authorized(proxy, peer)
                except _Refused as exc:
                    await context.abort(exc.status, str(exc))
                if pod is not None:
                    for response in self._responses(proxy, pod, snapshot):
                        yield response
                # Whatever arrived meanwhile is handled at once: ACKs of several types, a new snapshot.
                pending = []
                item = await inbox.get()
                while True:
                    if item is None:
                        return
                    if item is _CHANGED:
                        waiting = False
                    else:
                        pending.append(item)
                    if inbox.empty():
                        break
                    item = inbox.get_nowait()
        finally:
            reader.cancel()
            if proxy is not None:
                self._plane.unfollow(wake)
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
            raise _Refused(f"certificate {peer!r} is not the identity of pod {proxy.namespace}/{proxy.pod}",
                           grpc.StatusCode.PERMISSION_DENIED)
        return pod

    def _take(self, proxy: Proxy, request: discovery_pb2.DeltaDiscoveryRequest, limit: int) -> None:
        type_url = request.type_url
        if type_url not in TYPES:
            return
        name = TYPES[type_url]
        subscription = proxy.subscriptions.get(type_url)
        if subscription is None:  # a reconnecting proxy says what it holds: only what differs is sent
            subscription = proxy.subscriptions[type_url] = _Subscription(
                held=dict(request.initial_resource_versions))
        if type_url == ENDPOINTS:
            subscribed = {name for name in request.resource_names_subscribe if len(name) <= MAX_NAME_LENGTH}
            names = (subscription.names | subscribed) - set(request.resource_names_unsubscribe)
            if len(names) > limit:
                log.warning("proxy refused: it subscribed to more endpoints than there are",
                            extra={"proxy": proxy.node_id, "names": len(names), "limit": limit})
                raise _Refused(f"subscribed to {len(names)} endpoint resources, more than the {limit} allowed",
                               grpc.StatusCode.RESOURCE_EXHAUSTED)
            if names != subscription.names:
                subscription.names, subscription.synced = self._intern(frozenset(names)), None
                for dropped in subscription.held.keys() - names:
                    del subscription.held[dropped]
        # Each response is answered on its own (a later one does not carry an earlier one's resources); a nonce
        # not awaiting an answer is stale and ignored, a subscription change is not.
        answered = subscription.unanswered.pop(request.response_nonce, None)
        if answered is None:
            return
        carried, changed_at = answered
        if request.HasField("error_detail"):
            self._metrics.xds_nacks.labels(name).inc()
            log.warning("proxy rejected its config; it keeps its last good one",
                        extra={"proxy": proxy.node_id, "type": name, "error": request.error_detail.message[:500]})
            # Not applied: sent again with the next change (a full comparison), not now.
            for rejected in subscription.held.keys() & carried:
                subscription.held[rejected] = ""
            subscription.rejected = True
        else:
            subscription.acked = request.response_nonce
            if changed_at is not None:
                self._metrics.xds_convergence.labels(name).observe(time.monotonic() - changed_at)

    def _intern(self, names: frozenset[str]) -> frozenset[str]:
        """One object per distinct subscription: the responses shared by it are found by identity, not by
        comparing a thousand names per proxy. Pruned to the subscriptions in use when it outgrows them."""
        found = self._subscriptions.get(names)
        if found is None:
            if len(self._subscriptions) > 2 * len(self.proxies) + 16:
                self._subscriptions = {s.names: s.names for p in self.proxies.values()
                                       for s in p.subscriptions.values()}
            found = self._subscriptions.setdefault(names, names)
        return found

    def _responses(self, proxy: Proxy, pod: PodRecord, snapshot: Snapshot) -> list[bytes]:
        responses = []
        for type_url, name in TYPES.items():
            subscription = proxy.subscriptions.get(type_url)
            if subscription is None or subscription.synced == snapshot.generation:
                continue
            incremental = subscription.synced == snapshot.generation - 1 and not subscription.rejected
            response = self._plane.response(snapshot, type_url, pod, subscription.names, subscription.held,
                                            incremental)
            # Convergence is a change reaching proxies that had the state before it, not a proxy's first sync.
            changed_at = snapshot.changed_at if subscription.synced is not None else None
            subscription.synced, subscription.rejected = snapshot.generation, False
            if response is None:
                continue
            for item in response.items:
                subscription.held[item.name] = item.version
            for removed in response.removed:
                subscription.held.pop(removed, None)
            nonce = subscription.sent_nonce = str(next(self._nonces))
            subscription.unanswered[nonce] = (frozenset(item.name for item in response.items), changed_at)
            while len(subscription.unanswered) > UNANSWERED_KEPT:  # a proxy that never answers
                del subscription.unanswered[next(iter(subscription.unanswered))]
            responses.append(response.body + discovery_pb2.DeltaDiscoveryResponse(nonce=nonce).SerializeToString())
            self._metrics.xds_pushes.labels(name).inc()
        return responses

    def describe(self, namespace: str, pod: str) -> dict[str, Any] | None:
        """What the proxy of ``namespace/pod`` holds, for ``meshguard proxy-config``: each resource as sent when it
        holds the current snapshot's version, else its name and the version it holds (being replaced, or
        rejected: an empty version)."""
        record = self._plane.state.catalog.pod(namespace, pod)
        for proxy in self.proxies.values():
            if (proxy.namespace, proxy.pod) != (namespace, pod):
                continue
            snapshot = self._plane.current()
            resources = {}
            for type_url, subscription in proxy.subscriptions.items():
                wanted = self._plane.wanted(snapshot, type_url, record, subscription.names) if record else {}
                resources[TYPES[type_url]] = [
                    orjson.loads(wanted[name].json) if name in wanted and wanted[name].version == version
                    else {"name": name, "version": version} for name, version in sorted(subscription.held.items())]
            return {
                "node": proxy.node_id,
                "connected_at": proxy.connected_at,
                "nonces": {TYPES[t]: {"sent": s.sent_nonce, "acked": s.acked} for t, s in proxy.subscriptions.items()},
                "resources": resources,
            }
        return None


class _Refused(Exception):
    """The stream is ended with ``status``: the proxy's certificate is not its pod's, or it asks for too much."""

    def __init__(self, message: str, status: grpc.StatusCode) -> None:
        super().__init__(message)
        self.status = status


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
        servicer.DeltaAggregatedResources, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
        response_serializer=bytes)
    handler = grpc.method_handlers_generic_handler(SERVICE, {"DeltaAggregatedResources": method})
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

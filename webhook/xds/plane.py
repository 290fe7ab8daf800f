"""The control plane's state: snapshots of packed resources, rebuilt from the store after a burst of changes.

The store calls :meth:`ControlPlane.changed` for every watch event; a rebuild waits ``debounce_seconds`` of
quiet (at most ``max_delay_seconds`` after the first change), then builds the shared resources once, packs each
into a protobuf ``Any`` once, and wakes every stream. Each stream sends a proxy only the types whose version (a
digest of exactly what that proxy would get) changed.

Packing (the JSON through the protobuf schema) costs far more than building the JSON, so a resource whose JSON
did not change since the last snapshot keeps its packed form, and the proxies' inbound listeners, which depend
only on their resolved modes, are packed once per set of modes. Runs on the event loop, like the store's writes, so a
snapshot is never built from a half-applied change.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

# Imported for their descriptors: json_format resolves each "@type" of the JSON through them.
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.filters.network.set_filter_state.v3 import set_filter_state_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, json_format

from .. import envoy
from ..envoy import BootstrapOptions
from ..metrics import Metrics
from ..policy.mtls import Resolver
from ..state.catalog import PodRecord
from ..state.store import MESH_KINDS, PEER_AUTHENTICATION
from . import resources
from .resources import MeshState
from .settings import XdsSettings

log = logging.getLogger("meshguard.xds")

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
# Short names for logs and metric labels, in the order a push sends them (clusters before what refers to them).
TYPES = {CLUSTER: "cds", ENDPOINTS: "eds", LISTENER: "lds"}
_MESSAGES = {CLUSTER: cluster_pb2.Cluster, ENDPOINTS: endpoint_pb2.ClusterLoadAssignment,
             LISTENER: listener_pb2.Listener}
# The kinds whose changes reach the proxies.
FOLLOWED = frozenset({*MESH_KINDS, PEER_AUTHENTICATION})


@dataclass(frozen=True)
class Packed:
    """One resource as sent: its JSON (for ``proxy-config``), its ``Any``, and a digest of its bytes."""

    name: str
    json: dict[str, Any]
    any: any_pb2.Any
    digest: bytes


def pack(type_url: str, name: str, config: dict[str, Any]) -> Packed:
    message = json_format.ParseDict(config, _MESSAGES[type_url]())
    packed = any_pb2.Any()
    packed.Pack(message)
    return Packed(name, config, packed, hashlib.blake2b(packed.value, digest_size=16).digest())


def version_of(items: Iterable[Packed]) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for item in items:
        digest.update(item.name.encode() + b"\0" + item.digest)
    return digest.hexdigest()


@dataclass(frozen=True)
class Response:
    """A DiscoveryResponse as sent to any number of proxies: serialized once, without its nonce (each stream
    appends its own: protobuf messages concatenate)."""

    type_url: str
    version: str
    body: bytes
    items: tuple[Packed, ...]  # what it carries, for proxy-config

    @classmethod
    def of(cls, type_url: str, version: str, items: Iterable[Packed]) -> Response:
        carried = tuple(items)
        body = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url,
                                               resources=[item.any for item in carried]).SerializeToString()
        return cls(type_url, version, body, carried)


@dataclass
class Snapshot:
    generation: int
    changed_at: float  # monotonic time of the oldest change it carries (convergence is measured from it)
    clusters: dict[str, Packed]
    assignments: dict[str, Packed]
    outbound: Packed
    changed_assignments: frozenset[str]  # names whose assignment differs from the previous snapshot's
    responses: dict[Any, Response] = field(default_factory=dict)  # shared by every proxy asking the same

    def response(self, key: Any, build: Callable[[], Response]) -> Response:
        found = self.responses.get(key)
        if found is None:
            found = self.responses[key] = build()
        return found


class _Packer:
    """Packs resources, reusing the packed form of JSON it packed for the previous snapshot."""

    def __init__(self) -> None:
        self._previous: dict[bytes, Packed] = {}
        self._current: dict[bytes, Packed] = {}

    def __call__(self, type_url: str, name: str, config: dict[str, Any]) -> Packed:
        key = type_url.encode() + b"\0" + orjson.dumps(config, option=orjson.OPT_SORT_KEYS)
        packed = self._current.get(key) or self._previous.get(key) or pack(type_url, name, config)
        self._current[key] = packed
        return packed

    def next_snapshot(self) -> None:
        self._previous, self._current = self._current, {}


class ControlPlane:
    def __init__(self, state: MeshState, resolver: Resolver, options: BootstrapOptions, settings: XdsSettings,
                 metrics: Metrics) -> None:
        self.state = state
        self._resolver = resolver
        self._options = options
        self._settings = settings
        self._metrics = metrics
        self._dirty_since: float | None = None
        self._dirty = asyncio.Event()
        self._updated = asyncio.Condition()
        self.snapshot: Snapshot | None = None
        self._pack = _Packer()
        # (mode, port modes) -> the inbound listener for them; the options are fixed for the process.
        self._inbound: dict[tuple[str, tuple[tuple[int, str], ...]], Packed] = {}

    # -- change intake (the store's subscriber, on the loop's thread) ----------------------------------------

    def changed(self, kind: str) -> None:
        if kind not in FOLLOWED:
            return
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()
        self._dirty.set()

    async def run(self) -> None:
        """Rebuild after each burst of changes until cancelled."""
        settings = self._settings
        while True:
            await self._dirty.wait()
            assert self._dirty_since is not None
            while True:  # quiet for debounce_seconds, or max_delay_seconds since the burst began
                self._dirty.clear()
                left = self._dirty_since + settings.max_delay_seconds - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._dirty.wait(), min(settings.debounce_seconds, left))
                except TimeoutError:
                    break
            self._dirty.clear()
            since, self._dirty_since = self._dirty_since, None
            self.rebuild(since)
            async with self._updated:
                self._updated.notify_all()

    def rebuild(self, since: float | None = None) -> Snapshot:
        start = time.perf_counter()
        outbound = resources.outbound(self.state, self._resolver, self._options)
        previous = self.snapshot
        generation = previous.generation + 1 if previous else 1
        assignments = {name: self._pack(ENDPOINTS, name, a) for name, a in outbound.load_assignments.items()}
        before = previous.assignments if previous else {}
        self.snapshot = Snapshot(
            generation, since if since is not None else time.monotonic(),
            {name: self._pack(CLUSTER, name, c) for name, c in outbound.clusters.items()},
            assignments,
            self._pack(LISTENER, resources.OUTBOUND_LISTENER, outbound.listener),
            frozenset(name for name, packed in assignments.items() if before.get(name) is not packed),
        )
        self._pack.next_snapshot()
        self._metrics.xds_push_duration.labels().observe(time.perf_counter() - start)
        log.debug("xds snapshot built", extra={"generation": generation, "clusters": len(outbound.clusters)})
        return self.snapshot

    async def wait_for_change(self, generation: int) -> Snapshot:
        """The first snapshot newer than ``generation``."""
        async with self._updated:
            await self._updated.wait_for(lambda: self.snapshot is not None and self.snapshot.generation > generation)
        assert self.snapshot is not None
        return self.snapshot

    def current(self) -> Snapshot:
        return self.snapshot or self.rebuild()

    # -- per proxy ---------------------------------------------------------------------------------------------

    def response(self, snapshot: Snapshot, type_url: str, pod: PodRecord, names: frozenset[str],
                 endpoints_from: int | None) -> Response:
        """What ``pod``'s proxy gets of ``type_url``: every cluster; the assignments of the ``names`` it asked for
        (only those changed since snapshot ``endpoints_from`` when it has all of that one's, which Envoy allows
        for endpoints); the outbound listener and the inbound one for its modes. Built once per snapshot for
        all the proxies that get the same."""
        if type_url == CLUSTER:
            return snapshot.response(CLUSTER, lambda: self._whole(CLUSTER, snapshot.clusters.values()))
        if type_url == ENDPOINTS:
            def wanted() -> list[Packed]:
                return [snapshot.assignments[name] for name in sorted(names) if name in snapshot.assignments]

            whole = snapshot.response((ENDPOINTS, names), lambda: self._whole(ENDPOINTS, wanted()))
            if endpoints_from != snapshot.generation - 1:
                return whole
            return snapshot.response((ENDPOINTS, names, "changed"), lambda: Response.of(
                ENDPOINTS, whole.version, (item for item in whole.items if item.name in snapshot.changed_assignments)))
        mode, ports = self._resolver.modes(self.state, pod.namespace, pod.labels)
        key = (mode, tuple(sorted(ports.items())))
        inbound = self._inbound.get(key)
        if inbound is None:
            listener = envoy.inbound_listener(self._options, mode, ports)
            inbound = self._inbound[key] = pack(LISTENER, listener["name"], listener)
        return snapshot.response((LISTENER, key), lambda: self._whole(LISTENER, (snapshot.outbound, inbound)))

    @staticmethod
    def _whole(type_url: str, items: Iterable[Packed]) -> Response:
        carried = tuple(items)
        return Response.of(type_url, version_of(carried), carried)

"""The control plane's state: snapshots of packed resources, rebuilt from the store after a burst of changes.

The store calls :meth:`ControlPlane.changed` for every watch event; a rebuild waits ``debounce_seconds`` of
quiet (at most ``max_delay_seconds`` after the first change), then builds the shared resources once, packs each
into a protobuf ``Any`` once, and wakes every stream. Each stream sends its proxy only the resources that
changed for it (delta xDS): a proxy that had the previous snapshot gets the changes between the two, computed and
serialized once for every such proxy; any other (new, reconnected, resubscribed) gets the difference between what
it holds and what it should.

Packing (the JSON through the protobuf schema) costs far more than building the JSON, so a resource whose JSON
did not change since the last snapshot keeps its packed form, and the proxies' inbound listeners, which depend
only on their resolved modes, are packed once per set of modes. Runs on the event loop, like the store's writes, so a
snapshot is never built from a half-applied change.
"""

from __future__ import annotations

import asyncio
import gc
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
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2  # noqa: F401
from envoy.extensions.matching.input_matchers.ip.v3 import ip_pb2  # noqa: F401
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
    """One resource as sent: its JSON (serialized: a snapshot holds tens of thousands, kept out of the garbage
    collector's walks) and as a delta response carries it, versioned by a digest of its bytes (the same after a
    restart: a reconnecting proxy's resources need not be sent again)."""

    name: str
    json: bytes
    resource: discovery_pb2.Resource
    version: str  # one object, shared by every proxy's record of holding it (the message's would be a new one)


def pack(type_url: str, name: str, config: dict[str, Any], serialized: bytes | None = None) -> Packed:
    message = json_format.ParseDict(config, _MESSAGES[type_url]())
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    version = hashlib.blake2b(packed.value, digest_size=12).hexdigest()
    return Packed(name, serialized or orjson.dumps(config),
                  discovery_pb2.Resource(name=name, version=version, resource=packed), version)


@dataclass(frozen=True)
class Response:
    """A DeltaDiscoveryResponse as sent to any number of proxies: serialized once, without its nonce (each stream
    appends its own: protobuf messages concatenate)."""

    type_url: str
    body: bytes
    items: tuple[Packed, ...]
    removed: tuple[str, ...]

    @classmethod
    def of(cls, type_url: str, items: Iterable[Packed], removed: Iterable[str] = ()) -> Response:
        carried, gone = tuple(items), tuple(sorted(removed))
        body = discovery_pb2.DeltaDiscoveryResponse(type_url=type_url, resources=[item.resource for item in carried],
                                                    removed_resources=gone).SerializeToString()
        return cls(type_url, body, carried, gone)


# What a proxy holds of a type: name -> version ("" when unknown: sent and rejected).
Held = dict[str, str]


@dataclass
class Snapshot:
    generation: int
    changed_at: float  # monotonic time of the oldest change it carries (convergence is measured from it)
    clusters: dict[str, Packed]
    assignments: dict[str, Packed]
    outbound: Packed
    changed: dict[str, frozenset[str]]  # type -> names added or changed since the previous snapshot
    removed: dict[str, frozenset[str]]  # type -> names gone since the previous snapshot
    responses: dict[Any, Response | None] = field(default_factory=dict)  # shared by every proxy asking the same

    def response(self, key: Any, build: Callable[[], Response | None]) -> Response | None:
        if key not in self.responses:
            self.responses[key] = build()
        return self.responses[key]


def _difference(type_url: str, wanted: dict[str, Packed], held: Held) -> Response | None:
    items = [item for name, item in wanted.items() if held.get(name) != item.version]
    removed = [name for name in held if name not in wanted]
    return Response.of(type_url, items, removed) if items or removed else None


def _changes(previous: dict[str, Packed], current: dict[str, Packed]) -> tuple[frozenset[str], frozenset[str]]:
    return (frozenset(name for name, item in current.items() if previous.get(name) is not item),
            frozenset(previous.keys() - current.keys()))


class _Packer:
    """Packs resources, reusing the packed form of JSON it packed for the previous snapshot."""

    def __init__(self) -> None:
        self._previous: dict[bytes, Packed] = {}
        self._current: dict[bytes, Packed] = {}

    def __call__(self, type_url: str, name: str, config: dict[str, Any]) -> Packed:
        serialized = orjson.dumps(config, option=orjson.OPT_SORT_KEYS)
        key = type_url.encode() + b"\0" + serialized
        packed = self._current.get(key) or self._previous.get(key) or pack(type_url, name, config, serialized)
        self._current[key] = packed
        return packed

    def next_snapshot(self) -> None:
        self._previous, self._current = self._current, {}


class ControlPlane:
    def __init__(self, state: MeshState, resolver: Resolver, options: BootstrapOptions, settings: XdsSettings,
                 metrics: Metrics) -> None:
        self.state = state
        self._options = options
        self._settings = settings
        self._metrics = metrics
        self._dirty_since: float | None = None
        self._dirty = asyncio.Event()
        self._followers: set[Callable[[], None]] = set()
        self.snapshot: Snapshot | None = None
        self._pack = _Packer()
        self._modes = resources.PodModes(resolver, state)
        # (mode, port modes) -> the inbound listener for them; the options are fixed for the process.
        self._inbound_by_modes: dict[tuple[str, tuple[tuple[int, str], ...]], Packed] = {}

    # -- change intake (the store's subscriber, on the loop's thread) ----------------------------------------

    def changed(self, kind: str) -> None:
        if kind not in FOLLOWED:
            return
        if kind == PEER_AUTHENTICATION:
            self._modes.forget()
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
            try:
                self.rebuild(since)
            except Exception:  # a bug must not end every push: the proxies keep the last snapshot until the next
                log.exception("xds snapshot not built; proxies keep the previous one")
                continue
            for wake in self._followers:
                wake()

    def rebuild(self, since: float | None = None) -> Snapshot:
        # What a rebuild allocates lives until it returns or is freed by reference counting (JSON makes no
        # cycles): a collection meanwhile would only walk it, again and again as it grows.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._rebuild(since)
        finally:
            if collecting:
                gc.enable()

    def _rebuild(self, since: float | None) -> Snapshot:
        start = time.perf_counter()
        outbound = resources.outbound(self.state, self._modes, self._options)
        previous = self.snapshot
        clusters = {name: self._pack(CLUSTER, name, c) for name, c in outbound.clusters.items()}
        assignments = {name: self._pack(ENDPOINTS, name, a) for name, a in outbound.load_assignments.items()}
        listener = self._pack(LISTENER, resources.OUTBOUND_LISTENER, outbound.listener)
        changed, removed = {}, {}
        for type_url, now, before in ((CLUSTER, clusters, previous.clusters if previous else {}),
                                      (ENDPOINTS, assignments, previous.assignments if previous else {}),
                                      (LISTENER, {listener.name: listener},
                                       {previous.outbound.name: previous.outbound} if previous else {})):
            changed[type_url], removed[type_url] = _changes(before, now)
        self.snapshot = Snapshot(previous.generation + 1 if previous else 1,
                                 since if since is not None else time.monotonic(),
                                 clusters, assignments, listener, changed, removed)
        self._pack.next_snapshot()
        self._modes.prune()
        self._metrics.xds_push_duration.labels().observe(time.perf_counter() - start)
        log.debug("xds snapshot built", extra={"generation": self.snapshot.generation, "clusters": len(clusters)})
        return self.snapshot

    def follow(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` after each new snapshot (a stream's; it reads :meth:`current` when it gets to it)."""
        self._followers.add(wake)

    def unfollow(self, wake: Callable[[], None]) -> None:
        self._followers.discard(wake)

    def current(self) -> Snapshot:
        return self.snapshot or self.rebuild()

    # -- per proxy ---------------------------------------------------------------------------------------------

    def _inbound(self, pod: PodRecord) -> Packed:
        mode, ports = self._modes(pod)
        key = (mode, tuple(sorted(ports.items())))
        inbound = self._inbound_by_modes.get(key)
        if inbound is None:
            listener = envoy.inbound_listener(self._options, mode, ports)
            inbound = self._inbound_by_modes[key] = pack(LISTENER, listener["name"], listener)
        return inbound

    def wanted(self, snapshot: Snapshot, type_url: str, pod: PodRecord, names: frozenset[str]) -> dict[str, Packed]:
        """What ``pod``'s proxy should hold of ``type_url``: every cluster; the assignments of the ``names`` it
        subscribed to; the outbound listener and the inbound one for its modes."""
        if type_url == CLUSTER:
            return snapshot.clusters
        if type_url == ENDPOINTS:
            return {name: snapshot.assignments[name] for name in sorted(names) if name in snapshot.assignments}
        inbound = self._inbound(pod)
        return {snapshot.outbound.name: snapshot.outbound, inbound.name: inbound}

    def response(self, snapshot: Snapshot, type_url: str, pod: PodRecord, names: frozenset[str], held: Held,
                 incremental: bool) -> Response | None:
        """What ``pod``'s proxy, holding ``held``, is sent of ``type_url`` for ``snapshot``; None if nothing.
        ``incremental``: it holds all of the previous snapshot's (for the same subscription), so it gets that
        snapshot's changes, built once for all such proxies."""
        if type_url == LISTENER:  # two resources, one of them the proxy's own
            wanted = self.wanted(snapshot, type_url, pod, names)
            key = (type_url, tuple((item.name, item.version) for item in wanted.values()), tuple(sorted(held.items())))
            return snapshot.response(key, lambda: _difference(type_url, wanted, held))
        if incremental:
            def changes() -> Response | None:
                changed, removed = snapshot.changed[type_url], snapshot.removed[type_url]
                if type_url == ENDPOINTS:
                    changed, removed = changed & names, removed & names
                items = [item for name, item in self.wanted(snapshot, type_url, pod, names).items() if name in changed]
                return Response.of(type_url, items, removed) if items or removed else None

            return snapshot.response((type_url, names, "changes"), changes)
        if not held:  # a proxy's first request: shared by every proxy that starts with the same subscription
            return snapshot.response((type_url, names, "all"),
                                     lambda: _difference(type_url, self.wanted(snapshot, type_url, pod, names), {}))
        return _difference(type_url, self.wanted(snapshot, type_url, pod, names), held)

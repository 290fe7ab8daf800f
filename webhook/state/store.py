"""The in-memory cluster state the policy engine reads: Namespaces, NetworkPolicies, PeerAuthentications.

Sources (a live watch, manifest files) write; the admission path only reads, from memory, in microseconds.
All writes happen on the event loop's thread (the live source hands events over with ``call_soon_threadsafe``),
so reads never see a half-applied update and no lock is needed.

NetworkPolicies are indexed per namespace by the one requirement of their pod selector that a matching pod
must satisfy by *having* a label (``app=payment``, ``tier in (a,b)``, ``app`` exists): a pod with k labels looks
up k buckets, so a namespace with 10,000 policies still answers in microseconds. Policies with no such
requirement (``podSelector: {}``, only ``NotIn``/``DoesNotExist``) are kept in a short list checked for every pod.

The one exception to "memory only" is :meth:`Store.refresh`: before the handler denies a request it asks the
source to re-read the namespace live, so a denial is never based on a stale view.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..metrics import Metrics
from ..policy.mtls import PeerAuthentication, parse_peer_authentication
from ..policy.networkpolicy import NetworkPolicy, parse_network_policy
from ..workloads import labels_of, object_name
from . import catalog
from .catalog import Catalog

log = logging.getLogger("meshguard.state")

NAMESPACE = "Namespace"
NETWORK_POLICY = "NetworkPolicy"
PEER_AUTHENTICATION = "PeerAuthentication"
KINDS = (NAMESPACE, NETWORK_POLICY, PEER_AUTHENTICATION)
# What the control plane also follows (webhook/xds): where Services' endpoints are and which pods are meshed.
MESH_KINDS = catalog.KINDS
# The API server sets this label on every namespace; files rarely do, so the store adds it.
NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True, slots=True)
class NamespaceState:
    """A live re-read of one namespace. ``peer_authentications`` is None when they cannot be read (the CRD is
    not installed): the store then keeps what it has."""

    name: str
    namespace: dict[str, Any] | None
    network_policies: list[dict[str, Any]]
    peer_authentications: list[dict[str, Any]] | None


# Blocking: runs in a worker thread, never on the event loop.
Reader = Callable[[str], NamespaceState]


def namespace_of(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    ns = meta.get("namespace") if isinstance(meta, Mapping) else None
    return ns if isinstance(ns, str) else ""


@dataclass
class _PolicyIndex:
    policies: dict[str, NetworkPolicy] = field(default_factory=dict)
    by_value: defaultdict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    by_key: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    unanchored: set[str] = field(default_factory=set)

    def _buckets(self, policy: NetworkPolicy) -> list[set[str]]:
        anchor = policy.selector.anchor()
        if anchor is None:
            return [self.unanchored]
        if anchor.operator == "Exists":
            return [self.by_key[anchor.key]]
        return [self.by_value[(anchor.key, value)] for value in anchor.values]

    def add(self, policy: NetworkPolicy) -> None:
        self.remove(policy.name)
        self.policies[policy.name] = policy
        for bucket in self._buckets(policy):
            bucket.add(policy.name)

    def remove(self, name: str) -> None:
        old = self.policies.pop(name, None)
        if old is not None:
            for bucket in self._buckets(old):
                bucket.discard(name)

    def selecting(self, labels: Mapping[str, str]) -> list[NetworkPolicy]:
        names = set(self.unanchored)
        for key, value in labels.items():
            names.update(self.by_value.get((key, value), ()))
            names.update(self.by_key.get(key, ()))
        found = (self.policies[n] for n in names)
        return sorted((p for p in found if p.selector.matches(labels)), key=lambda p: p.name)


class Store:
    """Indexed cluster state. ``reader`` re-reads one namespace live (None for sources that are always
    current, such as files); ``recheck_timeout`` bounds how long a denial waits for it."""

    def __init__(self, reader: Reader | None = None, recheck_timeout: float = 2.0, metrics: Metrics | None = None):
        self._reader = reader
        self._timeout = recheck_timeout
        self._metrics = metrics
        self._namespaces: dict[str, Mapping[str, str]] = {}
        self._policies: dict[str, _PolicyIndex] = defaultdict(_PolicyIndex)
        self._peer_auths: dict[str, dict[str, PeerAuthentication]] = defaultdict(dict)
        self._inflight: dict[tuple[str, ...], asyncio.Future[bool]] = {}
        self.catalog = Catalog()
        self._subscribers: list[Callable[[str], None]] = []

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(kind)`` after every change (on the loop's thread; it must not block)."""
        self._subscribers.append(callback)

    def _changed(self, *kinds: str) -> None:
        for kind in kinds:
            if self._metrics is not None:
                self._metrics.state_objects.labels(kind).set(self.count(kind))
            for callback in self._subscribers:
                callback(kind)

    # -- reads (the policy engine's Snapshot) ---------------------------------------------------------------

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        return self._namespaces.get(namespace) or {NAME_LABEL: namespace}

    def has_namespace(self, namespace: str) -> bool:
        return namespace in self._namespaces

    def network_policies_selecting(self, namespace: str, labels: Mapping[str, str]) -> list[NetworkPolicy]:
        index = self._policies.get(namespace)
        return index.selecting(labels) if index else []

    def peer_authentications(self, namespace: str) -> list[PeerAuthentication]:
        return list(self._peer_auths.get(namespace, {}).values())

    def count(self, kind: str) -> int:
        if kind in MESH_KINDS:
            return self.catalog.count(kind)
        if kind == NAMESPACE:
            return len(self._namespaces)
        if kind == NETWORK_POLICY:
            return sum(len(index.policies) for index in self._policies.values())
        return sum(len(by_name) for by_name in self._peer_auths.values())

    # -- writes (sources) -----------------------------------------------------------------------------------

    def replace(self, kind: str, objects: Iterable[Mapping[str, Any]]) -> list[str]:
        """Make ``objects`` the whole content for ``kind`` (after a full list). Returns the problems with
        objects that were skipped (logged by the caller, fatal for ``meshguard check``)."""
        if kind in MESH_KINDS:
            self.catalog.replace(kind, ((obj, namespace_of(obj)) for obj in objects if object_name(obj)))
            self._changed(kind)
            return []
        if kind == NAMESPACE:
            self._namespaces.clear()
        elif kind == NETWORK_POLICY:
            self._policies.clear()
        else:
            self._peer_auths.clear()
        problems = [p for p in (self._put(kind, obj) for obj in objects) if p]
        self._changed(kind)
        return problems

    def apply(self, kind: str, event: str, obj: Mapping[str, Any]) -> str | None:
        """Apply one watch event (ADDED, MODIFIED, DELETED)."""
        problem = None
        if kind in MESH_KINDS:
            if event == "DELETED":
                self.catalog.delete(kind, object_name(obj), namespace_of(obj))
            elif object_name(obj):
                self.catalog.put(kind, obj, namespace_of(obj))
        elif event == "DELETED":
            self._delete(kind, object_name(obj), namespace_of(obj))
        else:
            problem = self._put(kind, obj)
        self._changed(kind)
        return problem

    def replace_namespace(self, state: NamespaceState) -> list[str]:
        """Install a live re-read of one namespace."""
        name = state.name
        if state.namespace is None:
            self._namespaces.pop(name, None)
        else:
            self._put(NAMESPACE, state.namespace)
        self._policies.pop(name, None)
        problems = [self._put(NETWORK_POLICY, obj, name) for obj in state.network_policies]
        if state.peer_authentications is not None:
            self._peer_auths.pop(name, None)
            problems += [self._put(PEER_AUTHENTICATION, obj, name) for obj in state.peer_authentications]
        self._changed(*KINDS)
        return [p for p in problems if p]

    def _put(self, kind: str, obj: Mapping[str, Any], namespace: str | None = None) -> str | None:
        name = object_name(obj)
        if not name:
            return f"a {kind} without metadata.name was ignored"
        if kind == NAMESPACE:
            self._namespaces[name] = {**labels_of(obj), NAME_LABEL: name}
            return None
        ns = namespace or namespace_of(obj)
        try:
            if kind == NETWORK_POLICY:
                self._policies[ns].add(parse_network_policy(obj, ns))
            else:
                self._peer_auths[ns][name] = parse_peer_authentication(obj, ns)
        except ValueError as exc:
            self._delete(kind, name, ns)  # an invalid update must not leave the previous version in force
            return f"{kind} {ns}/{name} was ignored: {exc}"
        return None

    def _delete(self, kind: str, name: str, ns: str) -> None:
        if kind == NAMESPACE:
            self._namespaces.pop(name, None)
        elif kind == NETWORK_POLICY:
            index = self._policies.get(ns)
            if index:
                index.remove(name)
        else:
            self._peer_auths.get(ns, {}).pop(name, None)

    # -- the live re-check before a denial -------------------------------------------------------------------

    async def refresh(self, namespaces: Sequence[str]) -> bool:
        """Re-read ``namespaces`` live and install the result. True when the store is now current for them
        (always, for a source without a reader); False when the read failed or timed out.

        Concurrent callers for the same namespaces share one read: a Deployment scaled to 50 denied pods costs
        one round trip, not 50."""
        if self._reader is None:
            return True
        key = tuple(dict.fromkeys(namespaces))
        shared = self._inflight.get(key)
        if shared is None:
            shared = asyncio.ensure_future(self._read(key))
            self._inflight[key] = shared
            shared.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(shared)

    async def _read(self, namespaces: tuple[str, ...]) -> bool:
        reader = self._reader
        assert reader is not None
        try:
            states = await asyncio.wait_for(
                asyncio.to_thread(lambda: [reader(ns) for ns in namespaces]), self._timeout
            )
        except TimeoutError:
            log.warning("live re-check timed out", extra={"namespaces": list(namespaces), "timeout": self._timeout})
            return False
        except Exception as exc:  # any failure to read means "not confirmed", never an error to the caller
            log.warning("live re-check failed", extra={"namespaces": list(namespaces), "error": str(exc)})
            return False
        for state in states:
            for problem in self.replace_namespace(state):
                log.warning("ignored an invalid object", extra={"problem": problem})
        return True

"""The manifest-file source: cluster state from the same YAML/JSON ``kubectl apply -f`` accepts.

``meshguard check`` evaluates a set of manifests against the policies in the same set; ``serve --dev --state
DIR`` serves against a directory. Such a directory is read at start and read again before every denial (the
file source's "live re-check"), so a policy file written while the server runs is honoured exactly as a
NetworkPolicy created an instant before a workload is in a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .. import manifests
from ..workloads import labels_of, object_name
from .catalog import ENDPOINT_SLICE, POD, SERVICE, SERVICE_CIDR
from .store import (
    KINDS,
    MESH_KINDS,
    NAMESPACE,
    NETWORK_POLICY,
    PEER_AUTHENTICATION,
    NamespaceState,
    Store,
    namespace_of,
)

log = logging.getLogger("meshguard.state")

# kind -> the API group its apiVersion must carry (a NetworkPolicy of another group is not Kubernetes').
_GROUPS = {NAMESPACE: "", NETWORK_POLICY: "networking.k8s.io", PEER_AUTHENTICATION: "security.istio.io",
           SERVICE: "", ENDPOINT_SLICE: "discovery.k8s.io", POD: "", SERVICE_CIDR: "networking.k8s.io"}
_CLUSTER_SCOPED = frozenset({NAMESPACE, SERVICE_CIDR})
# How often a served directory is looked at for changed files.
POLL_SECONDS = 0.5
# A file's timestamp is coarser than a nanosecond (a clock tick; two seconds on some file systems).
RACY_NS = 2_000_000_000


def _group(obj: Mapping[str, Any]) -> str:
    api_version = obj.get("apiVersion")
    return api_version.rsplit("/", 1)[0] if isinstance(api_version, str) and "/" in api_version else ""


def state_objects(objects: Iterable[dict[str, Any]], default_namespace: str,
                  kinds: tuple[str, ...] = KINDS) -> dict[str, list[dict[str, Any]]]:
    """The objects of ``kinds`` (by default the policy's: Namespaces, NetworkPolicies and PeerAuthentications)
    among ``objects``, by kind. Namespaced objects that name no namespace are placed in ``default_namespace`` (on a
    copy of their metadata), as kubectl does."""
    found: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for obj in objects:
        kind = obj.get("kind")
        if kind not in found or _group(obj) != _GROUPS[kind]:
            continue
        if kind not in _CLUSTER_SCOPED and not namespace_of(obj):
            meta = obj.get("metadata")
            obj = {**obj, "metadata": {**(meta if isinstance(meta, dict) else {}), "namespace": default_namespace}}
        found[kind].append(obj)
    return found


def build_store(objects: Iterable[dict[str, Any]], default_namespace: str,
                namespace_labels: Mapping[str, str] | None = None) -> tuple[Store, list[str]]:
    """A store holding the state found in ``objects``, and the problems with objects it had to skip.

    ``namespace_labels`` are added to ``default_namespace``'s labels (``check --namespace-labels``), whether or
    not the input defines that Namespace."""
    found = state_objects(objects, default_namespace)
    if namespace_labels:
        found[NAMESPACE] = _with_labels(found[NAMESPACE], default_namespace, namespace_labels)
    store = Store()
    problems = [p for kind, objs in found.items() for p in store.replace(kind, objs)]
    return store, problems


def _with_labels(namespaces: list[dict[str, Any]], name: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for ns in namespaces:
        if object_name(ns) == name:
            meta = ns["metadata"]
            ns = {**ns, "metadata": {**meta, "labels": {**labels_of(ns), **labels}}}
        out.append(ns)
    if not any(object_name(ns) == name for ns in namespaces):
        out.append({"apiVersion": "v1", "kind": NAMESPACE, "metadata": {"name": name, "labels": dict(labels)}})
    return out


def _by_name(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace_of(obj), object_name(obj)): obj for obj in objects}


class FileSource:
    """Cluster state from a directory of manifests; :meth:`read_namespace` re-reads it (the store's reader)."""

    def __init__(self, directory: Path, default_namespace: str = "default") -> None:
        self.directory = directory
        self.default_namespace = default_namespace
        self._installed: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}  # kind -> (namespace, name) -> obj
        self._files: dict[Path, tuple[tuple[int, int, int] | None, list[dict[str, Any]]]] = {}  # file -> stat, objects

    def read(self) -> dict[str, list[dict[str, Any]]]:
        """Raises :class:`webhook.manifests.ManifestError` when the directory or a file cannot be read."""
        return state_objects(self._objects(), self.default_namespace, (*KINDS, *MESH_KINDS))

    def _objects(self) -> list[dict[str, Any]]:
        """Every object of the directory; a file not changed since it was last read is not parsed again (its objects
        are the same ones: unchanged, they are not compared field by field either)."""
        if not self.directory.is_dir():
            return manifests.load([self.directory])  # says what is wrong with it
        files, objects = {}, []
        for file in manifests.files_in(self.directory):
            try:
                stat = file.stat()
            except OSError as exc:
                raise manifests.ManifestError(f"{file}: cannot read: {exc}") from None
            key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            held = self._files.get(file)
            if held is None or held[0] != key:
                # A file written in the last moments may be written again within its timestamp's granularity, at
                # the same size: it is read again until it is older than that (as git treats "racy" entries).
                racy = time.time_ns() - stat.st_mtime_ns < RACY_NS
                held = (None if racy else key, manifests.load_file(file))
            files[file] = held
            objects += held[1]
        self._files = files
        return objects

    def load(self, store: Store) -> list[str]:
        found = self.read()
        self._installed = {kind: _by_name(objects) for kind, objects in found.items()}
        return [p for kind, objs in found.items() for p in store.replace(kind, objs)]

    def _update(self, store: Store, found: dict[str, list[dict[str, Any]]]) -> list[str]:
        """Apply what changed since the last read as a watch delivers it: one event per object added, modified or
        deleted (so the store and the control plane see the change, not a reload)."""
        problems = []
        for kind, objects in found.items():
            now, before = _by_name(objects), self._installed.get(kind, {})
            events = [("DELETED", obj) for key, obj in before.items() if key not in now]
            events += [("MODIFIED" if key in before else "ADDED", obj) for key, obj in now.items()
                       if (old := before.get(key)) is not obj and old != obj]
            problems += [p for event, obj in events if (p := store.apply(kind, event, obj))]
            self._installed[kind] = now
        return problems

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        found = []
        for file in manifests.files_in(self.directory):
            try:
                stat = file.stat()
            except OSError:
                continue
            found.append((str(file), stat.st_mtime_ns, stat.st_size))
        return tuple(sorted(found))

    async def follow(self, store: Store) -> None:
        """Load the directory again whenever its files change, like a watch (the control plane's proxies see it)."""
        seen = self._fingerprint()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            now = self._fingerprint()
            if now == seen:
                continue
            seen = now
            try:
                found = await asyncio.to_thread(self.read)  # parsing is slow; the store is written on the loop
            except manifests.ManifestError as exc:  # a file half-written by an editor: keep the last good state
                log.warning("state directory not reloaded", extra={"error": str(exc)})
                seen = ()
                continue
            for problem in self._update(store, found):
                log.warning("ignored an invalid object", extra={"problem": problem})

    def read_namespace(self, namespace: str) -> NamespaceState:
        found = self.read()
        return NamespaceState(
            namespace,
            next((ns for ns in found[NAMESPACE] if object_name(ns) == namespace), None),
            [p for p in found[NETWORK_POLICY] if namespace_of(p) == namespace],
            [p for p in found[PEER_AUTHENTICATION] if namespace_of(p) == namespace],
        )

"""The live source: list, then watch, Namespaces, NetworkPolicies and PeerAuthentications into a Store.

One daemon thread per kind runs the official ``kubernetes`` client's blocking list/watch calls, and hands every
result to the event loop with ``call_soon_threadsafe``: the store is only ever written on the loop's thread, and
the request path never waits for the API server. The loop per kind is client-go's reflector in small:

* list (paged with ``limit``/``continue``), replace the kind in the store, remember the list's resourceVersion;
* watch from that resourceVersion; when a watch ends (server timeout, dropped connection) resume it from the
  last resourceVersion seen (events or bookmarks), with no re-list;
* on ``410 Gone`` (the resourceVersion was compacted away; an HTTP status or an ``ERROR`` event) list again;
* on any other failure wait with exponential backoff (with jitter, so replicas do not stampede) and resume.

PeerAuthentications are read only when their CRD is served (``security.istio.io/v1``, else ``v1beta1``), and
ServiceCIDRs only when the API server serves them (1.33 and later) and lets meshguard read them; when a kind is
not served, it counts as synced and empty (installed once, not at each look), and is looked for again every
``crd_poll_seconds``. A watch answered 404 means it stopped being served (the CRD was deleted): the kind is
listed again, which finds it absent.

Readiness is reported once every kind has completed its first list, withdrawn while any kind cannot be followed
(a list or watch failed, e.g. the API server restarts: the store may be missing changes), and reported again
once every kind is followed again. A watch that simply ends, or a 410, is routine and changes nothing.

Objects stay the JSON dicts the API server sent (``_preload_content=False``): typed models would cost time on
10,000 policies and drop fields this code does not know.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.watch.watch import iter_resp_lines

from ..errors import KubeError
from ..metrics import Metrics
from ..policy import mtls
from ..policy.settings import StateSettings
from ..workloads import WORKLOAD_KINDS
from .catalog import ENDPOINT_SLICE, SERVICE, SERVICE_CIDR
from .store import KINDS, NAMESPACE, NETWORK_POLICY, PEER_AUTHENTICATION, NamespaceState, Store

log = logging.getLogger("meshguard.state")

PLURAL = "peerauthentications"
GONE = 410
NOT_FOUND = 404
FORBIDDEN = 403
CONNECT_TIMEOUT = 10.0
LIST_TIMEOUT = 60.0  # one page of a list; a dead connection must not hang a watch thread forever


# The kinds meshguard does without when the API answers so (statuses), and what it then does. ServiceCIDRs only
# make the proxies' listener smaller: unreadable (RBAC managed apart from the chart) must not keep it unready.
_UNSERVED: dict[str, tuple[frozenset[int], str]] = {
    PEER_AUTHENTICATION: (frozenset({NOT_FOUND}),
                          "PeerAuthentication CRD not installed; mTLS resolves without PeerAuthentications"),
    SERVICE_CIDR: (frozenset({NOT_FOUND, FORBIDDEN}),
                   "ServiceCIDRs not served (before Kubernetes 1.33) or not readable (list/watch servicecidrs); the "
                   "proxies match each ClusterIP instead"),
}


class ClusterError(KubeError):
    """No usable cluster credentials, or the API server refused a request; the message says which."""


def api_client(kubeconfig: Path | None = None) -> client.ApiClient:
    """An API client from ``kubeconfig``; without one, the pod's service account when running in a cluster,
    else the client's usual kubeconfig lookup (``KUBECONFIG``, ``~/.kube/config``)."""
    try:
        if kubeconfig is None:
            try:
                configuration = client.Configuration()
                config.load_incluster_config(client_configuration=configuration)
                return client.ApiClient(configuration)
            except ConfigException:
                pass
        return config.new_client_from_config(config_file=str(kubeconfig) if kubeconfig else None)
    except (ConfigException, OSError) as exc:
        where = f" from {kubeconfig}" if kubeconfig else " (no in-cluster service account, no usable kubeconfig)"
        raise ClusterError(f"cannot load cluster credentials{where}: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Kind:
    api: str  # attribute of Cluster holding the typed API object
    cluster_list: str
    namespaced_list: str | None
    api_version: str


# The Cluster attribute serving each API group of the workload kinds.
_API_OF_GROUP = {"": "core", "apps": "apps", "batch": "batch"}
# The kinds meshguard reads: cluster state (the source, read-only RBAC) and workloads (``meshguard audit``).
_KINDS: dict[str, _Kind] = {
    NAMESPACE: _Kind("core", "list_namespace", None, "v1"),
    NETWORK_POLICY: _Kind("networking", "list_network_policy_for_all_namespaces", "list_namespaced_network_policy",
                          "networking.k8s.io/v1"),
    SERVICE: _Kind("core", "list_service_for_all_namespaces", None, "v1"),
    ENDPOINT_SLICE: _Kind("discovery", "list_endpoint_slice_for_all_namespaces", None, "discovery.k8s.io/v1"),
    SERVICE_CIDR: _Kind("networking", "list_service_cidr", None, "networking.k8s.io/v1"),
    **{name: _Kind(_API_OF_GROUP[k.group], k.list_call, None, k.api_version) for name, k in WORKLOAD_KINDS.items()},
}


class Cluster:
    """The read-only API calls meshguard makes (get, list, watch), over one API client."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.networking = client.NetworkingV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        # The PeerAuthentication version the API serves; None until found (or when the CRD is absent). Written
        # by the PeerAuthentication thread, read by live re-checks: a single reference, safe to share.
        self.peer_auth_version: str | None = None

    def list_function(self, kind: str, namespace: str | None = None, version: str | None = None) -> Callable[..., Any]:
        """The list (and watch) call for ``kind``, across all namespaces or in ``namespace``."""
        if kind == PEER_AUTHENTICATION:
            version = version or self.peer_auth_version or mtls.VERSIONS[0]
            if namespace is None:
                return partial(self.custom.list_cluster_custom_object, mtls.GROUP, version, PLURAL)
            return partial(self.custom.list_namespaced_custom_object, mtls.GROUP, version, namespace, PLURAL)
        spec = _KINDS[kind]
        api = getattr(self, spec.api)
        if namespace is None:
            return getattr(api, spec.cluster_list)
        assert spec.namespaced_list is not None
        return partial(getattr(api, spec.namespaced_list), namespace)

    def list(self, kind: str, page_size: int = 500, namespace: str | None = None, timeout: float | None = None,
             on_page: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], str] | None:
        """All objects of ``kind`` and the list's resourceVersion; None when the API does not serve the kind
        (the PeerAuthentication CRD is not installed, ServiceCIDRs before 1.33 or not readable). Items get
        ``kind``/``apiVersion``, which lists omit."""
        if kind == SERVICE_CIDR:
            try:
                return _list_pages(self.list_function(kind), kind, _KINDS[kind].api_version, page_size, timeout,
                                   on_page)
            except ApiException as exc:
                if exc.status in _UNSERVED[kind][0]:
                    return None
                raise
        if kind != PEER_AUTHENTICATION:
            return _list_pages(self.list_function(kind, namespace), kind, _KINDS[kind].api_version, page_size,
                               timeout, on_page)
        # The version found last time first: a live re-check should not pay for a 404.
        for version in sorted(mtls.VERSIONS, key=lambda v: v != self.peer_auth_version):
            try:
                listed = _list_pages(self.list_function(kind, namespace, version), kind, f"{mtls.GROUP}/{version}",
                                     page_size, timeout, on_page)
            except ApiException as exc:
                if exc.status != NOT_FOUND:
                    raise
                continue
            self.peer_auth_version = version
            return listed
        self.peer_auth_version = None
        return None

    def read_namespace(self, namespace: str, timeout: float) -> NamespaceState:
        """Blocking live re-read of one namespace (the store's reader, run in a worker thread)."""
        try:
            response = self.core.read_namespace(namespace, _preload_content=False, _request_timeout=timeout)
            ns_obj: dict[str, Any] | None = _json(response)
        except ApiException as exc:
            if exc.status != NOT_FOUND:
                raise
            ns_obj = None
        policies = self.list(NETWORK_POLICY, namespace=namespace, timeout=timeout)
        assert policies is not None  # only PeerAuthentications can be unserved
        peer_auths = self.list(PEER_AUTHENTICATION, namespace=namespace, timeout=timeout) \
            if self.peer_auth_version else None
        return NamespaceState(namespace, ns_obj, policies[0], peer_auths[0] if peer_auths else None)


def _json(response: Any) -> Any:
    try:
        return orjson.loads(response.data)
    finally:
        response.release_conn()


def _list_pages(function: Callable[..., Any], kind: str, api_version: str, page_size: int, timeout: float | None,
                on_page: Callable[[int], None] | None) -> tuple[list[dict[str, Any]], str]:
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"limit": page_size, "_preload_content": False}
        if token:
            kwargs["_continue"] = token
        if timeout:
            kwargs["_request_timeout"] = timeout
        try:
            body = _json(function(**kwargs))
        except ApiException as exc:
            if exc.status == GONE and token:  # the continue token expired: start over for a consistent snapshot
                items, token = [], None
                continue
            raise
        for item in body.get("items") or ():
            if isinstance(item, dict):
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", api_version)
                items.append(item)
        meta = body.get("metadata") or {}
        token = meta.get("continue")
        if on_page is not None:
            on_page(len(items))
        if not token:
            return items, str(meta.get("resourceVersion") or "")


class KubeSource:
    """Keeps a Store in step with the API server; :meth:`run` is the server's background job."""

    def __init__(self, cluster: Cluster, settings: StateSettings, metrics: Metrics,
                 kinds: tuple[str, ...] = KINDS) -> None:
        self.cluster = cluster
        self.kinds = kinds  # the policy kinds, and the control plane's (MESH_KINDS) when it runs
        self._settings = settings
        self._metrics = metrics
        self._stopping = threading.Event()
        self._streams: set[Any] = set()  # open watch responses (urllib3), so that stop() can interrupt them
        self._lock = threading.Lock()

    def read_namespace(self, namespace: str) -> NamespaceState:
        return self.cluster.read_namespace(namespace, self._settings.recheck_timeout_seconds)

    async def run(self, store: Store, synced: Callable[[], None]) -> None:
        """Follow every kind until cancelled. ``synced`` is called (on the loop) once every kind has been listed.

        A watch failing after that leaves the server ready, serving the state it has, as an informer does: every
        replica follows the same API server and would turn unready at once, and then pods of mesh namespaces
        could not be created (injection fails closed) and workloads would go unchecked (validation fails open)
        until the watches resumed, well after the API server was back. A denial never rests on that state: the
        namespace is read live first."""
        loop = asyncio.get_running_loop()
        lagging = set(self.kinds)  # kinds not yet listed, or whose last list or watch request failed
        first = True

        def following(kind: str, ok: bool) -> None:
            nonlocal first
            before = not lagging
            (lagging.discard if ok else lagging.add)(kind)
            if before == (not lagging):
                return
            if lagging:
                log.warning("cluster state not followed; serving the last state until it is",
                            extra={"kinds": sorted(lagging)})
                return
            log.info("cluster state synced", extra={k: store.count(k) for k in self.kinds})
            if first:
                first = False
                synced()

        def post(function: Callable[..., None], *args: Any) -> None:
            try:
                loop.call_soon_threadsafe(function, *args)
            except RuntimeError:  # the loop is closed: the server is shutting down
                self._stopping.set()

        self._stopping.clear()
        for kind in self.kinds:
            threading.Thread(target=self._follow, args=(kind, store, post, following), name=f"watch-{kind}",
                             daemon=True).start()
        try:
            await asyncio.Event().wait()
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop every thread: the flag ends the loops, shutting the sockets down ends the reads they block in."""
        with self._lock:
            self._stopping.set()
            for response in self._streams:
                with contextlib.suppress(Exception):  # already finished or released: nothing to interrupt
                    response.shutdown()

    def _follow(self, kind: str, store: Store, post: Callable[..., None],
                following: Callable[[str, bool], None]) -> None:
        settings = self._settings
        delay = settings.backoff_initial_seconds
        version: str | None = None
        absent = False
        while not self._stopping.is_set():
            try:
                if version is None:
                    listed = self.cluster.list(kind, settings.page_size, timeout=LIST_TIMEOUT)
                    if listed is None:
                        if not absent:  # once: installing nothing again would rebuild every proxy's config
                            log.info(_UNSERVED[kind][1])
                            post(self._install, store, kind, [])
                        absent = True
                        post(following, kind, True)
                        self._stopping.wait(settings.crd_poll_seconds)
                        continue
                    absent = False
                    items, version = listed
                    post(self._install, store, kind, items)
                    post(following, kind, True)
                version = self._watch(kind, version, store, post, following)
                delay = settings.backoff_initial_seconds
            except ApiException as exc:
                if self._stopping.is_set():
                    return
                if exc.status == GONE:
                    log.info("watch expired (410 Gone); listing again", extra={"kind": kind})
                    self._metrics.watch_restarts.labels(kind, "expired").inc()
                    version = None
                    continue
                if kind in _UNSERVED and exc.status in _UNSERVED[kind][0]:
                    log.info("kind no longer served; listing again", extra={"kind": kind})  # absent, or moved
                    version = None
                    continue
                post(following, kind, False)
                delay = self._back_off(kind, f"HTTP {exc.status} {exc.reason}", delay)
            except Exception as exc:  # connection refused/reset, read timeout, bad JSON: resume after a pause
                if self._stopping.is_set():
                    return
                post(following, kind, False)
                delay = self._back_off(kind, f"{type(exc).__name__}: {exc}", delay)

    def _back_off(self, kind: str, error: str, delay: float) -> float:
        log.warning("watch failed; retrying", extra={"kind": kind, "error": error, "retry_in_seconds": round(delay, 2)})
        self._metrics.watch_restarts.labels(kind, "error").inc()
        self._stopping.wait(delay * random.uniform(0.8, 1.2))
        return min(delay * 2, self._settings.backoff_max_seconds)

    def _watch(self, kind: str, version: str, store: Store, post: Callable[..., None],
               following: Callable[[str, bool], None]) -> str:
        """One watch request from ``version``; returns the last resourceVersion seen when it ends normally.

        The request is made with the typed API's list call (``watch=True``) and the stream read line by line
        here, rather than through ``kubernetes.watch.Watch``: the response is registered before any read, so
        :meth:`stop` can always interrupt it, and events stay JSON dicts with no model round trip."""
        timeout = self._settings.watch_timeout_seconds
        response = self.cluster.list_function(kind)(
            watch=True, resource_version=version, allow_watch_bookmarks=True, timeout_seconds=timeout,
            _preload_content=False, _request_timeout=(CONNECT_TIMEOUT, timeout + 30),
        )
        with self._lock:
            if self._stopping.is_set():
                response.release_conn()
                return version
            self._streams.add(response)
        post(following, kind, True)  # the API server accepted the watch: this kind is followed again
        try:
            for line in iter_resp_lines(response):
                if not line.strip():
                    continue
                event = orjson.loads(line)
                kind_of_event, obj = event.get("type"), event.get("object")
                if not isinstance(obj, dict):
                    continue
                if kind_of_event == "ERROR":  # a Status: 410 when the resourceVersion is too old
                    raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
                if kind_of_event in ("ADDED", "MODIFIED", "DELETED"):
                    post(self._event, store, kind, kind_of_event, obj)
                seen = (obj.get("metadata") or {}).get("resourceVersion")
                if isinstance(seen, str) and seen:
                    version = seen
        finally:
            with self._lock:
                self._streams.discard(response)
            response.release_conn()
        return version

    def _install(self, store: Store, kind: str, items: list[dict[str, Any]]) -> None:
        for problem in store.replace(kind, items):
            log.warning("ignored an invalid object", extra={"problem": problem})
        self._metrics.last_sync.labels(kind).set(time.time())

    @staticmethod
    def _event(store: Store, kind: str, event: str, obj: dict[str, Any]) -> None:
        problem = store.apply(kind, event, obj)
        if problem:
            log.warning("ignored an invalid object", extra={"problem": problem})


def read_all(
    cluster: Cluster, page_size: int, progress: Callable[[str, int], None]
) -> tuple[Store, list[dict[str, Any]]]:
    """One consistent-per-kind read of a whole cluster for ``meshguard audit``: the state store and every
    workload object. Raises :class:`ClusterError` naming the kind that could not be listed."""
    store = Store()
    objects: list[dict[str, Any]] = []
    for kind in (*KINDS, *WORKLOAD_KINDS):
        try:
            listed = cluster.list(kind, page_size, on_page=partial(progress, kind))
        except ApiException as exc:
            raise ClusterError(f"cannot list {kind} objects: HTTP {exc.status} {exc.reason}") from None
        except Exception as exc:  # urllib3's connection errors, a body that is not JSON
            raise ClusterError(f"cannot list {kind} objects: {exc}") from None
        items = listed[0] if listed else []
        if kind in KINDS:
            for problem in store.replace(kind, items):
                log.warning("ignored an invalid object", extra={"problem": problem})
        else:
            objects.extend(items)
    return store, objects

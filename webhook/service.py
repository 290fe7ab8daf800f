"""Wiring: turn the settings into webhooks, cluster state and background jobs, then serve.

This is the one place that knows which handler answers which path; the server knows only ``Webhook`` values
and the handlers know nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from . import kubejson, selfcert
from .certs import ensure_dev_certs
from .config import Settings
from .errors import KubeError
from .events import EventRecorder, Observer, recording
from .handlers import chain
from .identity import controller as identity
from .injection.handler import mutate_handler
from .manifests import ManifestError
from .metrics import Metrics
from .policy.handler import build_handler
from .policy.unmeshed import report_unmeshed
from .server import Readiness, Webhook, run
from .state import files, kube
from .state.store import KINDS, MESH_KINDS, Store
from .xds import server as xds_server
from .xds.plane import ControlPlane

log = logging.getLogger("meshguard")
Job = Callable[[], Coroutine[Any, Any, None]]

SERVICE_NAME = "meshguard"


def build_webhooks(settings: Settings, metrics: Metrics, store: Store,
                   observe: Observer | None = None) -> dict[str, Webhook]:
    """Each path's handler chain (``observe`` sees every answer: the Kubernetes Events)."""
    validate = report_unmeshed(build_handler(settings, store, metrics), store, settings, metrics)
    handlers = {"mutate": chain(mutate_handler(settings, metrics, store), settings.limits),
                "validate": chain(validate, settings.limits)}
    if observe is not None:
        handlers = {name: recording(handler, name, observe) for name, handler in handlers.items()}
    return {
        "mutate": Webhook(handlers["mutate"], allow_on_error=settings.failure.mutate == "allow"),
        "validate": Webhook(handlers["validate"], allow_on_error=settings.failure.validate_ == "allow"),
    }


def cluster_state(settings: Settings, metrics: Metrics, readiness: Readiness) -> tuple[Store, list[Job]]:
    """The store /validate reads, and the job that keeps it current: manifest files with ``state_dir``, nothing
    with ``--dev`` alone (ready at once, empty), else the live API (ready after the first complete list, and
    then while every kind is being followed)."""
    timeout = settings.policy.state.recheck_timeout_seconds
    if settings.state_dir is not None:
        source = files.FileSource(settings.state_dir)
        store = Store(source.read_namespace, timeout, metrics)
        try:
            problems = source.load(store)
        except ManifestError as exc:
            raise SystemExit(f"meshguard: cannot read the state directory: {exc}") from exc
        for problem in problems:
            log.warning("ignored an invalid object", extra={"problem": problem})
        readiness.set("state", True)
        return store, [lambda: source.follow(store)]
    if settings.dev:
        readiness.set("state", True)
        return Store(metrics=metrics), []
    try:
        kinds = (*KINDS, *MESH_KINDS) if settings.xds.enabled else KINDS
        live = kube.KubeSource(kube.Cluster(kube.api_client()), settings.policy.state, metrics, kinds)
    except kube.ClusterError as exc:
        raise SystemExit(f"meshguard: {exc} (use --dev to run without a cluster)") from exc
    store = Store(live.read_namespace, timeout, metrics)
    readiness.set("state", False)

    def synced() -> None:
        readiness.set("state", True)
        _freeze_heap()

    return store, [lambda: live.run(store, synced)]


def control_plane(settings: Settings, metrics: Metrics, store: Store,
                  ca: identity.MeshAuthority | None) -> tuple[xds_server.AggregatedDiscovery, list[Job]]:
    """The ADS server the proxies connect to, fed by the same store (and PeerAuthentication resolver) as
    /validate; mutual TLS when this process holds the mesh CA."""
    plane = ControlPlane(store, settings.policy.mtls.resolver, settings.injection.bootstrap_options(), settings.xds,
                         metrics)
    store.subscribe(plane.changed)
    servicer = xds_server.AggregatedDiscovery(plane, metrics, settings.injection.trust_domain, tls=ca is not None)

    async def serve() -> None:
        current = (lambda: ca.current) if ca is not None else None
        await xds_server.serve(servicer, settings.xds, current, settings.certificates.service, settings.namespace)

    return servicer, [plane.run, serve]


def serves_sleep_action(version: Mapping[str, Any]) -> bool:
    """Whether an API server of this ``/version`` accepts ``lifecycle.preStop.sleep`` (on by default from 1.30;
    managed clusters report minors such as "29+"). An unreadable version is taken as a recent one."""
    major, minor = str(version.get("major", "")), str(version.get("minor", "")).rstrip("+")
    if not (major.isdigit() and minor.isdigit()):
        return True
    return (int(major), int(minor)) >= (1, 30)


async def _sleep_action_served() -> bool:
    """Whether this cluster's API server accepts the preStop sleep action (:func:`serves_sleep_action`)."""
    try:
        version = await asyncio.to_thread(kubejson.call, kube.api_client(), "GET", "/version") or {}
    except (KubeError, kube.ClusterError) as exc:
        log.warning("cannot read the API server's version; assuming it serves the preStop sleep action",
                    extra={"error": str(exc)})
        return True
    if serves_sleep_action(version):
        return True
    log.info("the API server predates the preStop sleep action (1.30): proxies get no preStop",
             extra={"version": version.get("gitVersion")})
    return False


def _freeze_heap() -> None:
    """Move every object alive now (the loaded cluster state, imports) out of the garbage collector's reach.

    Tens of thousands of long-lived policy objects otherwise make each full collection walk them all, a pause
    that lands on whichever admission request triggered it. They are freed by reference counting as usual.
    """
    gc.collect()
    gc.freeze()


async def serve(settings: Settings) -> None:
    if settings.dev and ensure_dev_certs(settings.tls.cert_dir, SERVICE_NAME, settings.namespace):
        log.info("generated development certificates", extra={"cert_dir": str(settings.tls.cert_dir)})
    metrics = Metrics()
    background: list[Job] = []
    if settings.certificates.self_managed:
        try:
            certificates = await selfcert.start(settings)
        except (KubeError, OSError) as exc:
            raise SystemExit(f"meshguard: cannot set up the self-managed serving certificate: {exc}") from exc
        background.append(certificates.run)
    try:
        workload_identity = await identity.start(settings, metrics)
    except KubeError as exc:
        raise SystemExit(f"meshguard: cannot set up workload identity: {exc}") from exc
    in_cluster = not settings.dev and settings.state_dir is None
    # What the injector must know of this cluster and this process, found out at start.
    found: dict[str, Any] = {}
    if workload_identity is not None:
        background.extend(workload_identity.jobs)
        found.update(workload_identity.injection)
    elif settings.xds.enabled:
        # Without the mesh CA the ADS server cannot prove itself to the proxies: they connect in plaintext.
        found["xds_tls"] = False
    if in_cluster and settings.injection.prestop_sleep and not await _sleep_action_served():
        found["prestop_sleep"] = False
    if found:
        settings = settings.model_copy(update={"injection": settings.injection.model_copy(update=found)})
    readiness = Readiness()
    log.info(
        "starting",
        extra={
            "admission": f"https://{settings.server.host}:{settings.server.port}",
            "health": f"http://{settings.server.health_host}:{settings.server.health_port}",
            "dev": settings.dev,
        },
    )
    store, jobs = cluster_state(settings, metrics, readiness)
    background.extend(jobs)
    proxy_config = None
    if settings.xds.enabled:
        servicer, jobs = control_plane(settings, metrics, store, workload_identity.ca if workload_identity else None)
        background.extend(jobs)
        proxy_config = servicer.describe
    observe = None
    if settings.events and in_cluster:
        recorder = EventRecorder(kube.api_client(), metrics)
        background.append(recorder.run)
        observe = recorder.observe
    _freeze_heap()
    await run(settings, build_webhooks(settings, metrics, store, observe), readiness, metrics, background,
              proxy_config)

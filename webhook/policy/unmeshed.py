"""Pods that get into the mesh without the sidecar: found on admission, counted and logged, never silent.

The mutating webhook may have been down (``failurePolicy: Ignore``), timed out, or not been sent the pod; then the
pod reaches ``/validate`` without the proxy. A Pod's mTLS rule rejects it in ``enforce`` mode, but pods that
controllers create are only warned on (``policy.owned_action``), and a namespace may be in ``audit``. Whatever
lets such a pod in, ``/validate`` counts it in ``meshguard_unmeshed_pods_admitted_total{namespace, reason}`` and
logs a warning, and ``meshguard audit`` lists it later: both ask :func:`unmeshed_reason`.

Legitimate skips (opt-out label or annotation, hostNetwork, system, own or excluded namespaces) are not
counted: they are choices, and ``meshguard_injections_total{result="skipped"}`` already counts them by reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ..admission import AdmissionRequest, AdmissionResponse
from ..config import Settings
from ..handlers import WorkloadHandler
from ..injection.decision import decide, proxy_container_present, selected_for_mesh
from ..metrics import Metrics
from ..workloads import Workload
from .engine import Snapshot

log = logging.getLogger("meshguard.policy")

# reason -> why the pod has no proxy, for the log line
REASONS: Mapping[str, str] = {
    "not-injected": "the injector did not add the sidecar (it was unavailable with failurePolicy Ignore, timed out,"
                    " or was not sent the pod)",
    "status-without-proxy": "the pod carries the meshguard.io/status annotation but no meshguard-proxy container",
}


def unmeshed_reason(pod: Workload, namespace_labels: Mapping[str, str], settings: Settings) -> str | None:
    """Why a Pod that belongs in the mesh has no proxy container (a key of :data:`REASONS`), or None.

    None when it has the container, is not selected for the mesh, or was legitimately skipped. The status
    annotation alone does not count as the proxy: it makes the injector skip the pod, so a pod that copied it
    would otherwise stay un-meshed unnoticed.
    """
    if proxy_container_present(pod.template) or not selected_for_mesh(namespace_labels, pod.labels):
        return None
    decision = decide(pod, settings.injection, settings.namespace)
    if decision.inject:
        return "not-injected"
    return "status-without-proxy" if decision.reason == "already-injected" else None


def report_unmeshed(handler: WorkloadHandler, state: Snapshot, settings: Settings,
                    metrics: Metrics) -> WorkloadHandler:
    """``handler`` (``/validate``), counting and logging each Pod CREATE it admits that :func:`unmeshed_reason`
    finds. Dry runs admit nothing and are not counted."""

    async def handle(request: AdmissionRequest, pod: Workload | None) -> AdmissionResponse:
        response = await handler(request, pod)
        if (not response.allowed or request.dry_run or request.object is None or request.operation != "CREATE"
                or request.kind != "Pod" or request.group != ""):
            return response
        if pod is None or pod.kind != "Pod":
            return response
        reason = unmeshed_reason(pod, state.namespace_labels(pod.namespace), settings)
        if reason is not None:
            metrics.unmeshed_pods.labels(pod.namespace, reason).inc()
            log.warning("pod admitted without the meshguard sidecar",
                        extra={"uid": request.uid, "namespace": pod.namespace, "object": pod.name, "reason": reason,
                               "why": REASONS[reason]})
        return response

    return handle

"""``POST /mutate``: the admission handler around :func:`webhook.injection.patch.plan`.

Only Pod CREATE requests are considered; everything else (UPDATE, DELETE, other kinds, subresources) is allowed
unchanged. Dry-run requests get the same patch: injection has no side effects. Each answer carries its reason
code, which the server logs, and is counted in ``meshguard_injections{result, reason}``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..admission import AdmissionRequest, AdmissionResponse, allowed, denied, patched
from ..config import Settings
from ..handlers import WorkloadHandler
from ..metrics import Metrics
from ..policy.mtls import PeerAuthentications
from ..workloads import Workload
from .overrides import OverrideError
from .patch import NameConflict, plan

NOT_A_POD_CREATE = "not-a-pod-create"
INVALID_OVERRIDE = "invalid-override"
NAME_CONFLICT = "name-conflict"


def mutate_handler(settings: Settings, metrics: Metrics, state: PeerAuthentications | None = None) -> WorkloadHandler:
    """With ``state`` and a static bootstrap, each proxy enforces its pod's PeerAuthentications as resolved now."""
    injection, own_namespace = settings.injection, settings.namespace
    inbound = None
    if state is not None and injection.xds_address is None:
        resolver = settings.policy.mtls.resolver

        def inbound(workload: Workload) -> tuple[str, Mapping[int, str]]:
            return resolver.modes(state, workload.namespace, workload.labels)

    def respond(request: AdmissionRequest, workload: Workload | None) -> tuple[str, AdmissionResponse]:
        pod_create = request.operation == "CREATE" and request.kind == "Pod" and request.group == ""
        if not pod_create or workload is None or workload.kind != "Pod":
            return "skipped", allowed(reason=NOT_A_POD_CREATE)
        try:
            outcome = plan(workload, injection, own_namespace, inbound)
        except (OverrideError, NameConflict) as exc:
            message = f"meshguard cannot inject the sidecar into {workload.display}: {exc}"
            reason = NAME_CONFLICT if isinstance(exc, NameConflict) else INVALID_OVERRIDE
            return "denied", denied(message, reason=reason, code=400)
        if not outcome.decision.inject:
            return "skipped", allowed(reason=outcome.decision.reason)
        return "injected", patched(outcome.ops, reason="injected")

    async def handle(request: AdmissionRequest, workload: Workload | None) -> AdmissionResponse:
        result, response = respond(request, workload)
        metrics.injections.labels(result, response.reason).inc()
        return response

    return handle

"""``POST /validate``: the admission handler around :class:`webhook.policy.engine.Engine`.

Pods and pod controllers are checked on CREATE and UPDATE; everything else is allowed. The answer follows the
strictest failing action: ``enforce`` denies (HTTP 403 in ``status``, one line per failed rule), ``warn`` allows
with ``warnings`` (kubectl prints each as ``Warning: ...``), ``audit`` allows and only logs and counts.

Before a denial the namespace's state is re-read live (:meth:`LiveSnapshot.refresh`) and the workload evaluated
again, so a NetworkPolicy created an instant before the workload is seen. If the re-read fails or times out the
request is allowed with a warning: meshguard never denies on state it could not confirm.

Two kinds of update are only warned on, never denied: an object being deleted (finalizers must come off), and
an update that leaves the pods unchanged (labels, inject annotation and spec of the template), such as a
replica count change, which cannot make anything less safe than it already is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..admission import AdmissionRequest, AdmissionResponse, allowed, denied
from ..config import Settings
from ..handlers import WorkloadHandler
from ..injection.annotations import PREFIX
from ..injection.decision import proxy_container_present
from ..metrics import LoopCounter, Metrics
from ..workloads import WORKLOAD_KINDS, Workload, as_workload
from . import integrity
from .engine import NETWORK_POLICY, ORDERING_HINT, Engine, Evaluation, LiveSnapshot, RuleResult
from .settings import Action

EPHEMERAL = "ephemeralcontainers"
# Reason codes of the answers, in metrics and logs; events read POLICY_WARN.
NOT_CHECKED, POLICY_PASS, POLICY_WARN = "not-checked", "policy-pass", "policy-warn"
UNCONFIRMED = "meshguard could not re-read this namespace's policies from the API server, so it allowed this"


def _pods_of(workload: Workload) -> tuple[Any, ...]:
    """What the rules read from a pod template; an update that keeps it cannot change a verdict's cause. Every
    meshguard annotation counts: adding its status annotation alone would make every new pod skip injection."""
    meshguard = {k: v for k, v in workload.annotations.items() if k.startswith(PREFIX)}
    return workload.labels, meshguard, workload.pod_spec


def _unchanged(workload: Workload, old: Workload | None) -> bool:
    try:
        return old is not None and _pods_of(old) == _pods_of(workload)
    except RecursionError:  # nested deeper than Python compares (JSON allows 1024 levels): checked as changed
        return False


def _old(request: AdmissionRequest, workload: Workload) -> Workload | None:
    old = request.old_object
    return as_workload(old, workload.namespace) if request.operation == "UPDATE" and isinstance(old, dict) else None


def _debug_containers(workload: Workload, request: AdmissionRequest, engine: Engine,
                      store: LiveSnapshot) -> AdmissionResponse:
    """``kubectl debug`` adds ephemeral containers through their own subresource, which the injector never sees:
    in a pod carrying the proxy they must not run as its uid nor hold the capabilities to undo the redirect."""
    if not proxy_container_present(workload.template) or engine.exemption(
            workload, store.namespace_labels(workload.namespace)):
        return allowed(reason=NOT_CHECKED)
    problems = integrity.tenant_problems(workload.pod_spec, engine.proxy_uid, ("ephemeralContainers",))
    if not problems:
        return allowed(reason=POLICY_PASS)
    why, fix, _ = problems[0]
    return denied(f"{workload.display}: its debug container could bypass the meshguard proxy: {why}; {fix}",
                  reason="policy-violation")


def _deleting(obj: Mapping[str, Any]) -> bool:
    meta = obj.get("metadata")
    return isinstance(meta, Mapping) and bool(meta.get("deletionTimestamp"))


def build_handler(settings: Settings, store: LiveSnapshot, metrics: Metrics) -> WorkloadHandler:
    engine = Engine(settings)

    async def handle(request: AdmissionRequest, workload: Workload | None) -> AdmissionResponse:
        obj = request.object
        if request.operation not in ("CREATE", "UPDATE") or obj is None:
            return allowed(reason=NOT_CHECKED)
        if workload is None or request.kind != workload.kind or WORKLOAD_KINDS[workload.kind].group != request.group:
            return allowed(reason="not-a-workload")
        if request.sub_resource == EPHEMERAL:
            return _debug_containers(workload, request, engine, store)
        if request.sub_resource:
            return allowed(reason=NOT_CHECKED)
        cap: Action = "enforce"
        old = _old(request, workload)  # read once: for the "pods unchanged" test and for the rules
        if request.operation == "UPDATE" and (_deleting(obj) or _unchanged(workload, old)):
            cap = "warn"
        by_controller = request.user in settings.policy.controller_users
        evaluation = engine.evaluate(workload, store, cap, old, by_controller)
        notes: tuple[str, ...] = ()
        if evaluation.failing("enforce"):
            fresh = await store.refresh((workload.namespace, engine.root_namespace))
            metrics.policy_rechecks.labels("fresh" if fresh else "failed").inc()
            if not fresh:
                cap, notes = "warn", (UNCONFIRMED,)
            evaluation = engine.evaluate(workload, store, cap, old, by_controller)
        return _respond(evaluation, metrics.policy_results, notes)

    return handle


def _denial(enforced: tuple[RuleResult, ...]) -> str:
    """Every failed rule in one line: kubectl puts its prefix before the first line only."""
    details = (r.detail + (ORDERING_HINT if r.rule == NETWORK_POLICY else "") for r in enforced)
    return f"{enforced[0].workload}: " + "; also, ".join(details)


def _respond(evaluation: Evaluation, results: LoopCounter, notes: tuple[str, ...]) -> AdmissionResponse:
    if evaluation.exempt:
        return replace(allowed(reason="exempt"), details={"exempt": evaluation.exempt})
    for result in evaluation.results:
        results.labels(result.rule, result.action, "pass" if result.passed else "fail").inc()
    warnings = (*(r.warning for r in evaluation.failing("warn")), *notes)
    enforced = evaluation.failing("enforce")
    if enforced:
        response = denied(_denial(enforced), reason="policy-violation", warnings=warnings)
    elif warnings:
        response = allowed(reason=POLICY_WARN, warnings=warnings)
    else:
        response = allowed(reason="policy-audit" if evaluation.failures else POLICY_PASS)
    if not evaluation.failures:
        return response
    # The admission log line carries these: for audit-mode failures, the log and the metric are the report.
    violations = [f"[{r.rule}:{r.action}] {r.message}" for r in evaluation.failures]
    return replace(response, details={"violations": violations})

"""What ``meshguard check`` and ``meshguard audit`` print: the engine's verdicts as text or JSON.

Both commands build a :class:`Report` from plain objects and a state snapshot; the I/O (reading files, listing a
cluster) stays in the CLI, so the report logic is tested without either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ..config import Settings
from ..injection.decision import PROXY_NAME
from ..workloads import Workload, as_workload, controller_owner
from .engine import Engine, Evaluation, Snapshot
from .unmeshed import unmeshed_reason


@dataclass(frozen=True, slots=True)
class Report:
    evaluations: tuple[Evaluation, ...]
    # audit only: Pods that should carry the proxy and do not (created while the injector was down).
    without_sidecar: tuple[Workload, ...] = ()

    @property
    def failed(self) -> bool:
        return bool(self.without_sidecar) or any(not e.passed for e in self.evaluations)


def check(engine: Engine, state: Snapshot, workloads: Iterable[Workload]) -> Report:
    """Every workload of a set of manifests."""
    return Report(tuple(engine.evaluate(w, state) for w in workloads))


def audit(engine: Engine, state: Snapshot, settings: Settings, objects: Iterable[dict[str, Any]]) -> Report:
    """A live cluster's workloads. Objects a controller owns (a Deployment's ReplicaSets and their Pods) are
    judged through their owner and not listed again; every Pod is still looked at for a missing sidecar."""
    evaluations: list[Evaluation] = []
    without: list[Workload] = []
    for obj in objects:
        workload = as_workload(obj)
        if workload is None:
            continue
        if controller_owner(obj) is None:
            evaluations.append(engine.evaluate(workload, state))
        if workload.kind == "Pod" and _lacks_sidecar(workload, state, settings):
            without.append(workload)
    return Report(tuple(evaluations), tuple(without))


def _lacks_sidecar(pod: Workload, state: Snapshot, settings: Settings) -> bool:
    return unmeshed_reason(pod, state.namespace_labels(pod.namespace), settings) is not None


def _entry(evaluation: Evaluation) -> dict[str, Any]:
    w = evaluation.workload
    return {
        "kind": w.kind,
        "namespace": w.namespace,
        "name": w.name,
        "passed": evaluation.passed,
        "exempt": evaluation.exempt,
        "rules": [
            {"rule": r.rule, "passed": r.passed, "action": r.action, "message": r.message}
            for r in evaluation.results
        ],
    }


def _sidecar_message(pod: Workload) -> str:
    return (f"{pod.display}: in the mesh but has no {PROXY_NAME} container (created while the injector was down?); "
            "delete it so that its controller recreates it with the sidecar")


def summary(report: Report) -> Mapping[str, int]:
    evaluations = report.evaluations
    return {
        "workloads": len(evaluations),
        "failed": sum(1 for e in evaluations if not e.passed),
        "exempt": sum(1 for e in evaluations if e.exempt),
        "podsWithoutSidecar": len(report.without_sidecar),
    }


def render_json(report: Report) -> str:
    body = {
        "workloads": [_entry(e) for e in report.evaluations],
        "podsWithoutSidecar": [
            {"namespace": p.namespace, "name": p.name, "message": _sidecar_message(p)} for p in report.without_sidecar
        ],
        "summary": summary(report),
    }
    return orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n"


def render_text(report: Report) -> str:
    lines: list[str] = []
    for e in report.evaluations:
        if e.exempt:
            lines.append(f"EXEMPT {e.workload.display}: {e.exempt}")
            continue
        lines.append(f"{'PASS' if e.passed else 'FAIL'}   {e.workload.display}")
        lines.extend(f"       {r.rule} [{r.action}]: {r.detail}" for r in e.failures)
    if report.without_sidecar:
        lines.append("")
        lines.append("Pods in the mesh without the sidecar:")
        lines.extend(f"  {_sidecar_message(p)}" for p in report.without_sidecar)
    counts = summary(report)
    lines.append("")
    lines.append(
        f"{counts['workloads']} workloads: {counts['failed']} failed, "
        f"{counts['workloads'] - counts['failed'] - counts['exempt']} passed, {counts['exempt']} exempt"
        + (f"; {counts['podsWithoutSidecar']} pods without the sidecar" if report.without_sidecar else "")
    )
    return "\n".join(lines) + "\n"


def render(report: Report, output: str) -> str:
    return render_json(report) if output == "json" else render_text(report)

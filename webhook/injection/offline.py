"""``meshguard inject``: the server's injection applied to manifests on disk, like ``istioctl kube-inject``.

The same :func:`~webhook.injection.patch.plan` produces the same patch the webhook would return, applied here
with jsonpatch to the Pod or to the controller's pod template; every other object passes through untouched.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from ..config import Settings
from ..errors import MeshguardError
from ..workloads import iter_workloads
from .overrides import OverrideError
from .patch import NameConflict, plan


class InjectError(MeshguardError, ValueError):
    """A workload in the input cannot be injected (an invalid override annotation); the message names it."""


def inject(objects: list[dict[str, Any]], settings: Settings, default_namespace: str) -> list[str]:
    """Inject into every workload of ``objects`` in place; returns one note per workload left unchanged."""
    notes: list[str] = []
    for workload in iter_workloads(objects, default_namespace):
        try:
            outcome = plan(workload, settings.injection, settings.namespace)
        except (OverrideError, NameConflict) as exc:
            raise InjectError(f"{workload.display}: {exc}") from None
        if outcome.ops:
            # The planned values are shared, cached dicts: copy them into each manifest.
            jsonpatch.apply_patch(workload.obj, copy.deepcopy(outcome.ops), in_place=True)
        else:
            notes.append(f"left {workload.display} unchanged: {outcome.decision.message}")
    return notes

"""Per-pod override annotations: parse and validate each one, and apply them on top of the configured defaults.

Only those the platform allows (``injection.allowed_overrides``) are accepted. Every value is checked before
anything is injected, so that a typo never produces a pod the API server or the
kubelet rejects later with a message about a container the user did not write. An invalid annotation rejects
the pod with a sentence naming the annotation and the format it accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import MeshguardError
from ..quoting import quoted
from .annotations import OVERRIDES, PREFIX
from .settings import InjectionSettings, resource_problem


class OverrideError(MeshguardError, ValueError):
    """One or more override annotations are invalid; ``problems`` holds one sentence per annotation."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def apply_overrides(settings: InjectionSettings, annotations: Mapping[str, str]) -> InjectionSettings:
    """``settings`` with the pod's override annotations applied; raises :class:`OverrideError` listing every bad one.

    A pod without overrides (the common case) gets ``settings`` itself back, so caches keyed on it keep hitting.
    """
    if not any(key.startswith(PREFIX) for key in annotations):
        return settings  # the common case, on every pod creation: no meshguard annotation at all
    update: dict[str, Any] = {}
    problems: list[str] = []
    for name, (field, parse, accepted) in OVERRIDES.items():
        raw = annotations.get(PREFIX + name)
        if raw is None:
            continue
        if name not in settings.allowed_overrides:
            problems.append(f"annotation {PREFIX}{name} is not one the platform lets pods set "
                            "(injection.allowed_overrides); remove it")
            continue
        try:
            update[field] = parse(raw)
        except ValueError:
            problems.append(f"annotation {PREFIX}{name}: {quoted(raw)} is invalid; expected {accepted}; "
                            "fix or remove it")
    if problems:
        raise OverrideError(problems)
    if not update:
        return settings
    effective = settings.model_copy(update=update)
    problem = resource_problem(effective)
    if problem:
        message, request, limit = problem
        raise OverrideError([f"{message}; make annotation {_annotation(request)} <= {_annotation(limit)}"])
    return effective



def _annotation(field: str) -> str:
    return PREFIX + field.replace("_", "-")

"""Caps on what one Pod or pod template may carry, checked before any webhook does its work.

A request within the body size limit can still hold a pod with tens of thousands of containers or labels; every
step after decoding (the injection plan, label selectors, messages) grows with them. Limits far above any real
pod bound that work and answer the hostile or broken object with one clear line instead. The answer is a denial
on both webhooks, never the failure mode: if an oversized pod were allowed unchecked, padding a pod would be a
way around policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import LimitSettings
from .workloads import CONTAINER_LISTS, Workload

OVER_LIMIT = "over-limit"


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (list, dict)) else 0


def _metadata(template: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = template.get("metadata")
    return meta if isinstance(meta, dict) else {}


def problem(workload: Workload, limits: LimitSettings) -> str | None:
    """The sentence saying which limit the workload's pod template exceeds, or None when it is within them all.

    Entries are counted as sent, whatever their shape: the handlers deal with malformed ones, this only bounds
    how many there are.
    """
    meta = _metadata(workload.template)
    spec = workload.pod_spec
    counts = (
        (sum(_size(spec.get(key)) for key in CONTAINER_LISTS), limits.max_containers, "containers", "max_containers"),
        (_size(meta.get("labels")), limits.max_labels, "labels", "max_labels"),
        (_size(meta.get("annotations")), limits.max_annotations, "annotations", "max_annotations"),
    )
    for count, limit, what, key in counts:
        if count > limit:
            return (f"meshguard refuses {workload.display}: its pods have {count} {what}, more than the limit of "
                    f"{limit} (limits.{key}); no real pod needs that many, so check what generated it")
    return None

"""NetworkPolicy as the coverage rule sees it: which pods it selects and which directions it isolates.

Only ``podSelector`` and the isolated directions matter for coverage: a policy that selects a pod isolates it
for a direction even when it allows everything in that direction (the pod then accepts only what *some* policy
allows), and a default-deny (``podSelector: {}`` with no rules) is the simplest coverage there is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..workloads import object_name
from .selectors import Selector, parse_selector

INGRESS = "Ingress"
EGRESS = "Egress"
DIRECTIONS = (INGRESS, EGRESS)


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    namespace: str
    name: str
    selector: Selector
    directions: frozenset[str]

    @property
    def display(self) -> str:
        return f"{self.namespace}/{self.name}"


def isolated_directions(spec: Mapping[str, Any]) -> frozenset[str]:
    """The directions a policy isolates, with the API server's defaulting of an omitted ``policyTypes``:
    Ingress always, Egress only when the policy has egress rules."""
    types = spec.get("policyTypes")
    if isinstance(types, list) and types:
        return frozenset(t for t in types if t in DIRECTIONS)
    egress = spec.get("egress")
    return frozenset((INGRESS, EGRESS)) if isinstance(egress, list) and egress else frozenset((INGRESS,))


def parse_network_policy(obj: Mapping[str, Any], namespace: str) -> NetworkPolicy:
    """Raises :class:`~webhook.policy.selectors.SelectorError` when the pod selector is invalid.

    An omitted ``podSelector`` is ``{}``: the API server stores the Go zero value, which selects every pod.
    """
    spec = obj.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    name = object_name(obj)
    return NetworkPolicy(
        namespace=namespace,
        name=name,
        selector=parse_selector(spec.get("podSelector"), f"NetworkPolicy {namespace}/{name} spec.podSelector"),
        directions=isolated_directions(spec),
    )


def coverage(selecting: Iterable[NetworkPolicy], required: Iterable[str]) -> tuple[dict[str, NetworkPolicy], list[str]]:
    """Split the required directions into covered (with the first policy, by name, that isolates each) and
    missing. ``selecting`` must already be the policies whose selector matches the pod."""
    ordered = sorted(selecting, key=lambda p: p.name)
    covered: dict[str, NetworkPolicy] = {}
    missing: list[str] = []
    for direction in required:
        policy = next((p for p in ordered if direction in p.directions), None)
        if policy is None:
            missing.append(direction)
        else:
            covered[direction] = policy
    return covered, missing

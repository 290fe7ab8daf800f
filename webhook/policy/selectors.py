"""Kubernetes ``LabelSelector`` semantics, exactly as the API server and the network plugins apply them.

A selector is the AND of its requirements: every ``matchLabels`` entry is an equality requirement, every
``matchExpressions`` entry one of ``In``, ``NotIn``, ``Exists``, ``DoesNotExist``. ``NotIn`` and
``DoesNotExist`` match objects that lack the key; a selector with no requirements (``{}``) matches everything.
The rules are re-implemented rather than delegated to a client library because the policy engine evaluates
them on every admission and must agree with the cluster to the letter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import MeshguardError

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
OPERATORS: frozenset[str] = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})


class SelectorError(MeshguardError, ValueError):
    """A LabelSelector the API server would reject (unknown operator, missing or extra values...)."""


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels

    def __str__(self) -> str:
        if self.operator == "In" and len(self.values) == 1:
            return f"{self.key}={next(iter(self.values))}"
        if self.operator in ("In", "NotIn"):
            return f"{self.key} {self.operator.lower()} ({','.join(sorted(self.values))})"
        return self.key if self.operator == "Exists" else f"!{self.key}"


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed LabelSelector; ``Selector(())`` selects everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def anchor(self) -> Requirement | None:
        """The requirement an index should file this selector under: one that every matching object must
        satisfy *by having a label*. ``In`` with the fewest values wins over ``Exists``; a selector made only of
        ``NotIn``/``DoesNotExist`` (or of nothing) has no anchor and must be checked against every object."""
        positive = (r for r in self.requirements if r.operator in ("In", "Exists"))
        return min(positive, key=lambda r: (r.operator != "In", len(r.values)), default=None)

    def __str__(self) -> str:
        """kubectl's notation (``app=web,tier in (a,b),!canary``); ``{}`` for select-all."""
        return ",".join(str(r) for r in self.requirements) if self.requirements else "{}"


EVERYTHING = Selector()


def parse_selector(obj: Any, where: str = "selector") -> Selector:
    """Parse a LabelSelector dict; ``None`` and ``{}`` select everything. Raises :class:`SelectorError`."""
    if obj is None:
        return EVERYTHING
    if not isinstance(obj, Mapping):
        raise SelectorError(f"{where} must be a mapping with matchLabels and/or matchExpressions")
    unknown = set(obj) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise SelectorError(f"{where} has unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    requirements: list[Requirement] = []
    match_labels = obj.get("matchLabels") or {}
    if not isinstance(match_labels, Mapping):
        raise SelectorError(f"{where}.matchLabels must be a mapping of label key to value")
    for key, value in match_labels.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise SelectorError(f"{where}.matchLabels must map label keys to string values, got {key!r}: {value!r}")
        requirements.append(Requirement(key, "In", frozenset((value,))))
    expressions = obj.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise SelectorError(f"{where}.matchExpressions must be a list")
    for i, expr in enumerate(expressions):
        requirements.append(_expression(expr, f"{where}.matchExpressions[{i}]"))
    return Selector(tuple(requirements))


def _expression(expr: Any, where: str) -> Requirement:
    if not isinstance(expr, Mapping):
        raise SelectorError(f"{where} must be a mapping with key, operator and values")
    key, operator, values = expr.get("key"), expr.get("operator"), expr.get("values")
    if not isinstance(key, str) or not key:
        raise SelectorError(f"{where}.key must be a non-empty string")
    if operator not in OPERATORS:
        raise SelectorError(f"{where}.operator must be one of In, NotIn, Exists, DoesNotExist, got {operator!r}")
    if values is None:
        values = []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise SelectorError(f"{where}.values must be a list of strings")
    if operator in ("In", "NotIn") and not values:
        raise SelectorError(f"{where}: operator {operator} needs at least one value")
    if operator in ("Exists", "DoesNotExist") and values:
        raise SelectorError(f"{where}: operator {operator} takes no values")
    return Requirement(key, operator, frozenset(values))


def format_labels(labels: Mapping[str, str]) -> str:
    """``{app=payment, tier=web}``: how messages show a pod's labels."""
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"

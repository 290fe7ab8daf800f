"""LabelSelector semantics: a table of the Kubernetes rules, then a property test against an independent model."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhook.policy.selectors import SelectorError, format_labels, parse_selector

WEB = {"app": "web", "tier": "frontend"}


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({}, {}, True),
        ({}, WEB, True),
        (None, WEB, True),
        ({"matchLabels": {}}, WEB, True),
        ({"matchLabels": {"app": "web"}}, WEB, True),
        ({"matchLabels": {"app": "web"}}, {"app": "api"}, False),
        ({"matchLabels": {"app": "web"}}, {}, False),
        ({"matchLabels": {"app": "web", "tier": "frontend"}}, WEB, True),
        ({"matchLabels": {"app": "web", "tier": "backend"}}, WEB, False),
        ({"matchLabels": {"app": ""}}, {"app": ""}, True),
        ({"matchLabels": {"app": ""}}, {}, False),
        ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]}, WEB, True),
        ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["api"]}]}, WEB, False),
        ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}, {}, False),
        ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["api"]}]}, WEB, True),
        ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, WEB, False),
        # NotIn and DoesNotExist match pods that lack the key.
        ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, {}, True),
        ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, {}, True),
        ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, WEB, False),
        ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, WEB, True),
        ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, {"app": ""}, True),
        ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, {"tier": "x"}, False),
        ({"matchExpressions": [{"key": "app", "operator": "Exists", "values": []}]}, WEB, True),
        # matchLabels AND matchExpressions.
        ({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["x"]}]},
         WEB, False),
        ({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "Exists"}]}, WEB, True),
        ({"matchExpressions": [{"key": "app", "operator": "Exists"}, {"key": "app", "operator": "DoesNotExist"}]},
         WEB, False),
        ({"matchExpressions": []}, WEB, True),
        ({"matchLabels": None, "matchExpressions": None}, WEB, True),
    ],
)
def test_kubernetes_semantics(selector: Any, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(selector).matches(labels) is expected


@pytest.mark.parametrize(
    ("selector", "fragment"),
    [
        ("app=web", "must be a mapping"),
        ({"matchLabel": {"app": "web"}}, "unknown field(s) matchLabel"),
        ({"matchLabels": ["app"]}, "matchLabels must be a mapping"),
        ({"matchLabels": {"app": 1}}, "string values"),
        ({"matchExpressions": {"key": "app"}}, "must be a list"),
        ({"matchExpressions": ["app"]}, "must be a mapping"),
        ({"matchExpressions": [{"operator": "Exists"}]}, "key must be a non-empty string"),
        ({"matchExpressions": [{"key": "app", "operator": "in", "values": ["a"]}]}, "operator must be one of"),
        ({"matchExpressions": [{"key": "app", "operator": "In"}]}, "needs at least one value"),
        ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": []}]}, "needs at least one value"),
        ({"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]}, "takes no values"),
        ({"matchExpressions": [{"key": "app", "operator": "In", "values": "web"}]}, "list of strings"),
    ],
)
def test_invalid_selectors_are_rejected_with_their_path(selector: Any, fragment: str) -> None:
    with pytest.raises(SelectorError) as raised:
        parse_selector(selector, "spec.podSelector")
    assert fragment in str(raised.value)
    assert str(raised.value).startswith("spec.podSelector")


def test_kubectl_notation_and_anchor() -> None:
    selector = parse_selector({
        "matchLabels": {"app": "web"},
        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["b", "a"]},
                             {"key": "canary", "operator": "DoesNotExist"},
                             {"key": "team", "operator": "Exists"},
                             {"key": "env", "operator": "NotIn", "values": ["dev"]}],
    })
    assert str(selector) == "app=web,tier in (a,b),!canary,team,env notin (dev)"
    assert str(parse_selector({})) == "{}"
    # The index files a selector under its most specific positive requirement.
    assert str(selector.anchor()) == "app=web"
    assert str(parse_selector({"matchExpressions": [{"key": "team", "operator": "Exists"},
                                                    {"key": "t", "operator": "In", "values": ["a", "b"]}]}).anchor()) \
        == "t in (a,b)"
    assert parse_selector({"matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]}).anchor() is None
    assert format_labels({"b": "2", "a": "1"}) == "{a=1, b=2}"


# -- property test against an independent reference model --------------------------------------------------------

KEYS = st.sampled_from(["app", "tier", "env", "example.com/team"])
VALUES = st.sampled_from(["", "web", "api", "db", "v1"])
LABELS = st.dictionaries(KEYS, VALUES, max_size=4)


@st.composite
def expressions(draw: st.DrawFn) -> dict[str, Any]:
    operator = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
    expr: dict[str, Any] = {"key": draw(KEYS), "operator": operator}
    if operator in ("In", "NotIn"):
        expr["values"] = draw(st.lists(VALUES, min_size=1, max_size=3))
    return expr


SELECTORS = st.fixed_dictionaries(
    {}, optional={"matchLabels": st.dictionaries(KEYS, VALUES, max_size=3),
                  "matchExpressions": st.lists(expressions(), max_size=3)}
)


def reference_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """The Kubernetes documentation's rules, written as set algebra over label pairs, not as the code under test."""
    pairs = set(labels.items())
    keys = set(labels)
    if not set(selector.get("matchLabels", {}).items()) <= pairs:
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], set(expr.get("values", []))
        with_key = {(k, v) for k, v in pairs if k == key}
        if op == "In" and not {v for _, v in with_key} & values:
            return False
        if op == "NotIn" and {v for _, v in with_key} & values:
            return False
        if op == "Exists" and key not in keys:
            return False
        if op == "DoesNotExist" and key in keys:
            return False
    return True


@given(SELECTORS, LABELS)
def test_matches_the_reference_model(selector: dict[str, Any], labels: dict[str, str]) -> None:
    assert parse_selector(selector).matches(labels) is reference_matches(selector, labels)


@given(SELECTORS, LABELS)
def test_an_anchored_selector_only_matches_pods_carrying_its_anchor(selector: dict[str, Any],
                                                                     labels: dict[str, str]) -> None:
    """What the store's index relies on: a pod without the anchor label (value) is never selected."""
    parsed = parse_selector(selector)
    anchor = parsed.anchor()
    if anchor is not None and parsed.matches(labels):
        assert anchor.key in labels
        if anchor.operator == "In":
            assert labels[anchor.key] in anchor.values

"""The event-loop series must expose exactly what prometheus_client's own Counter and Histogram would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from webhook.metrics import LATENCY_BUCKETS, LoopCounter, LoopHistogram, Metrics


def _exposed(registry: CollectorRegistry) -> list[str]:
    """The exposition lines, without the ``_created`` samples only prometheus_client's own series have."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


observations = st.lists(st.one_of(st.sampled_from(LATENCY_BUCKETS), st.floats(0, 20, allow_nan=False)), max_size=50)


@given(observations)
def test_histogram_exposes_what_prometheus_client_would(values: list[float]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram("demo_seconds", "Demo.", ["webhook"], ours, LATENCY_BUCKETS)
    reference = Histogram("demo_seconds", "Demo.", ["webhook"], registry=theirs, buckets=LATENCY_BUCKETS)
    for value in values:
        loop.labels("mutate").observe(value)
        reference.labels("mutate").observe(value)
    assert _exposed(ours) == _exposed(theirs)


def test_counter_exposes_what_prometheus_client_would() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopCounter("demo", "Demo.", ["result", "reason"], ours)
    reference = Counter("demo", "Demo.", ["result", "reason"], registry=theirs)
    for labels, amount in ((("injected", "injected"), 1), (("skipped", "opt-out"), 2.5), (("injected", "injected"), 1)):
        loop.labels(*labels).inc(amount)
        reference.labels(*labels).inc(amount)
    assert _exposed(ours) == _exposed(theirs)
    assert 'demo_total{reason="injected",result="injected"} 2.0' in _exposed(ours)


def test_a_value_on_a_bound_counts_in_that_bucket() -> None:
    registry = CollectorRegistry()
    LoopHistogram("demo_bytes", "Demo.", [], registry, (1024, 4096)).labels().observe(1024)
    lines = _exposed(registry)
    assert 'demo_bytes_bucket{le="1024.0"} 1.0' in lines and 'demo_bytes_bucket{le="+Inf"} 1.0' in lines


def test_wrong_number_of_label_values_is_refused() -> None:
    counter = LoopCounter("demo", "Demo.", ["result", "reason"], CollectorRegistry())
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels("injected")


def test_every_family_is_described_once() -> None:
    names = [family.name for family in Metrics().registry.collect()]
    assert len(names) == len(set(names)) and "meshguard_admission_duration_seconds" in names

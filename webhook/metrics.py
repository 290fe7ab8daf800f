"""Prometheus collectors, all in the ``meshguard_`` namespace, on a registry of their own.

A private registry (instead of the process-global default) lets tests and several app instances in one process
each have their own counters.

The series every admission request updates are :class:`LoopCounter` and :class:`LoopHistogram`: plain numbers
turned into Prometheus families when scraped, through the client library's custom-collector interface.
``prometheus_client``'s own ``Counter`` and ``Histogram`` take a lock for every increment and scan the buckets in
Python for every observation, a measurable share of a whole ``/mutate`` answer under load
(docs/benchmarks.md#speed-tricks). meshguard updates these series and serves ``/metrics`` from one event-loop
thread, so there is nothing to lock. Series updated from other threads (the cluster watches) stay
``prometheus_client``'s own.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .workloads import WORKLOAD_KINDS

# Label values the admission series keep as they are; anything else is counted as "other".
KNOWN_KINDS = frozenset({*WORKLOAD_KINDS, "unknown"})
KNOWN_OPERATIONS = frozenset({"CREATE", "UPDATE", "DELETE", "CONNECT", "unknown"})

# Admission latency: most answers take well under a millisecond; the API server's timeout is seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Control-plane pushes and convergence: milliseconds when small, seconds for a large cluster's first push.
XDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BODY_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 8388608)


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Distribution:
    __slots__ = ("_bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # The first bound >= value: Prometheus buckets count observations less than or equal to their bound.
        self.counts[bisect_left(self._bounds, value)] += 1
        self.total += value


class _LoopFamily(Collector):
    """A labelled family whose children are created on first use and kept (label values are bounded by the
    callers: kinds, operations and reasons are normalised or fixed codes)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, list(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def _new_child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values!r}")
            child = self._children[values] = self._new_child()
        return child

    def describe(self) -> Iterator[Any]:
        yield self._family()

    def _family(self) -> Any:
        raise NotImplementedError


class LoopCounter(_LoopFamily):
    """A counter (exposed as ``<name>_total``) updated only from the event-loop thread."""

    def _new_child(self) -> _Count:
        return _Count()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family


class LoopHistogram(_LoopFamily):
    """A histogram updated only from the event-loop thread."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry,
                 buckets: Sequence[float]) -> None:
        self._bounds = tuple(float(b) for b in buckets)
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _Distribution:
        return _Distribution(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = self._family()
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*self._bounds, float("inf")), child.counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(values, buckets, child.total)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = LoopCounter(
            "meshguard_admission_requests", "Admission requests answered.",
            ["webhook", "kind", "operation", "decision"], registry=r,
        )
        self.duration = LoopHistogram(
            "meshguard_admission_duration_seconds", "Time to answer an admission request, body read to response.",
            ["webhook", "kind", "operation", "decision"], r, LATENCY_BUCKETS,
        )
        self.body_bytes = LoopHistogram(
            "meshguard_admission_request_body_bytes", "Size of admission request bodies.",
            ["webhook"], r, BODY_BUCKETS,
        )
        self.rejected_bodies = LoopCounter(
            "meshguard_admission_bad_requests", "Bodies answered with HTTP 4xx (not a usable AdmissionReview).",
            ["webhook", "status"], registry=r,
        )
        self.injections = LoopCounter(
            "meshguard_injections", "Sidecar injection answers by result (injected, skipped, denied) and reason.",
            ["result", "reason"], registry=r,
        )
        self.policy_results = LoopCounter(
            "meshguard_policy_results", "Policy rule results on /validate by rule, action and result (pass, fail).",
            ["rule", "action", "result"], registry=r,
        )
        self.policy_rechecks = LoopCounter(
            "meshguard_policy_live_rechecks", "Live namespace re-reads before a denial, by outcome (fresh, failed).",
            ["outcome"], registry=r,
        )
        self.state_objects = Gauge(
            "meshguard_state_objects", "Objects in the cluster-state store, by kind.", ["kind"], registry=r,
        )
        self.watch_restarts = Counter(
            "meshguard_state_watch_restarts", "Watches restarted, by kind and reason (expired: 410 Gone, error).",
            ["kind", "reason"], registry=r,
        )
        self.last_sync = Gauge(
            "meshguard_state_last_full_sync_timestamp_seconds", "Unix time of the last complete list, by kind.",
            ["kind"], registry=r,
        )
        self.certificate_expiry = Gauge(
            "meshguard_serving_certificate_expiry_timestamp_seconds",
            "Unix time at which the serving certificate in use expires.", registry=r,
        )
        self.certificate_expiring = Gauge(
            "meshguard_serving_certificate_expiring",
            "1 when the serving certificate in use expires within tls.expiry_warning_days, else 0.", registry=r,
        )
        self.mesh_ca_expiry = Gauge(
            "meshguard_mesh_ca_expiry_timestamp_seconds", "Unix time at which the mesh CA that signs expires.",
            registry=r,
        )
        self.mesh_ca_expiring = Gauge(
            "meshguard_mesh_ca_expiring",
            "1 when the mesh CA expires within identity.ca_renew_before_days with no successor on its way (a CA of "
            "the platform's own: meshguard does not replace it), else 0.", registry=r,
        )
        self.unmeshed_pods = LoopCounter(
            "meshguard_unmeshed_pods_admitted", "Pods /validate admitted in the mesh without the sidecar, by reason.",
            ["namespace", "reason"], registry=r,
        )
        self.events = LoopCounter(
            "meshguard_events", "Kubernetes Events for denials, warnings and skips, by outcome (posted, failed, "
            "dropped: the queue was full).", ["outcome"], registry=r,
        )
        self.xds_connected = Gauge(
            "meshguard_xds_connected_proxies", "Proxies with an open ADS stream to this replica.", registry=r,
        )
        self.xds_pushes = LoopCounter(
            "meshguard_xds_pushes", "Discovery responses sent, by resource type (cds, eds, lds).", ["type"], registry=r,
        )
        self.xds_push_duration = LoopHistogram(
            "meshguard_xds_push_duration_seconds", "Time to build the resources of one push for every proxy.",
            [], r, XDS_BUCKETS,
        )
        self.xds_convergence = LoopHistogram(
            "meshguard_xds_convergence_seconds",
            "From a cluster change seen by the watch to a proxy's ACK of the config that carries it, by type.",
            ["type"], r, XDS_BUCKETS,
        )
        self.xds_nacks = LoopCounter(
            "meshguard_xds_nacks", "Configs a proxy rejected (it keeps its last good one), by type.", ["type"],
            registry=r,
        )

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def kind_label(kind: str) -> str:
    """``kind`` if meshguard handles it, else ``other``: a request cannot grow the number of series."""
    return kind if kind in KNOWN_KINDS else "other"


def operation_label(operation: str) -> str:
    return operation if operation in KNOWN_OPERATIONS else "other"

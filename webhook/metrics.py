"""Prometheus collectors, all in the ``meshguard_`` namespace, on a registry of their own.

A private registry (instead of the process-global default) lets tests and several app instances in one process
each have their own counters.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Label values the admission series keep as they are; anything else is counted as "other".
KNOWN_KINDS = frozenset({"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "ReplicationController",
                         "Job", "CronJob", "unknown"})
KNOWN_OPERATIONS = frozenset({"CREATE", "UPDATE", "DELETE", "CONNECT", "unknown"})

# Admission latency: most answers take well under a millisecond; the API server's timeout is seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BODY_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 8388608)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "meshguard_admission_requests", "Admission requests answered.",
            ["webhook", "kind", "operation", "decision"], registry=r,
        )
        self.duration = Histogram(
            "meshguard_admission_duration_seconds", "Time to answer an admission request, body read to response.",
            ["webhook", "kind", "operation", "decision"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.body_bytes = Histogram(
            "meshguard_admission_request_body_bytes", "Size of admission request bodies.",
            ["webhook"], buckets=BODY_BUCKETS, registry=r,
        )
        self.rejected_bodies = Counter(
            "meshguard_admission_bad_requests", "Bodies answered with HTTP 4xx (not a usable AdmissionReview).",
            ["webhook", "status"], registry=r,
        )
        self.injections = Counter(
            "meshguard_injections", "Sidecar injection answers by result (injected, skipped, denied) and reason.",
            ["result", "reason"], registry=r,
        )
        self.policy_results = Counter(
            "meshguard_policy_results", "Policy rule results on /validate by rule, action and result (pass, fail).",
            ["rule", "action", "result"], registry=r,
        )
        self.policy_rechecks = Counter(
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
        self.unmeshed_pods = Counter(
            "meshguard_unmeshed_pods_admitted", "Pods /validate admitted in the mesh without the sidecar, by reason.",
            ["namespace", "reason"], registry=r,
        )

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Series:
    """The labelled children of one collector, each looked up once.

    ``collector.labels()`` validates and locks on every call; the admission path asks for the same few children
    on every request. At most ``limit`` label sets are kept (label values come from requests); past that the
    lookup still works, uncached.
    """

    def __init__(self, collector: Any, limit: int = 4096) -> None:
        self._collector = collector
        self._children: dict[tuple[str, ...], Any] = {}
        self._limit = limit

    def __call__(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._collector.labels(*labels)
            if len(self._children) < self._limit:
                self._children[labels] = child
        return child


def kind_label(kind: str) -> str:
    """``kind`` if meshguard handles it, else ``other``: a request cannot grow the number of series."""
    return kind if kind in KNOWN_KINDS else "other"


def operation_label(operation: str) -> str:
    return operation if operation in KNOWN_OPERATIONS else "other"

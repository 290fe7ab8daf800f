"""Keeps ``bench/e2e_throughput.py`` working: a few pods per phase, no figures asserted (benchmarks are separate)."""

from __future__ import annotations

from bench.e2e_throughput import measure, prepare
from tests.e2e.cluster import ControlPlane, Meshguard
from tests.e2e.objects import injected


def test_throughput_benchmark_runs_and_leaves_the_webhooks_on(cluster: ControlPlane, meshguard: Meshguard) -> None:
    namespaces = prepare(cluster)
    result = measure(cluster, namespaces, pods=6, rounds=1, concurrency=2)
    assert (result.failures, len(result.on), len(result.off)) == (0, 1, 1)
    assert result.retained > 0
    # The webhook configurations were re-created as the chart made them, and the API server calls them again.
    cluster.apply([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "after"},
                    "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}}],
                  "-n", namespaces[0])
    assert injected(cluster.kubectl_json("get", "pod", "after", "-n", namespaces[0]))

"""Keeps ``bench/e2e_throughput.py`` working: a few pods per phase, no figures asserted (benchmarks are separate)."""

from __future__ import annotations

import pytest

from bench.e2e_throughput import MODES, measure, prepare
from tests.e2e.cluster import ControlPlane, Meshguard
from tests.e2e.objects import injected, pod

pytestmark = pytest.mark.bench


def test_throughput_benchmark_runs_and_leaves_meshguard_answering(cluster: ControlPlane, meshguard: Meshguard) -> None:
    namespaces = prepare(cluster)
    # 30 pods: meshguard spends under 2 ms of CPU per pod, and the kernel counts CPU time in 10 ms ticks.
    result = measure(cluster, meshguard, namespaces, pods=30, rounds=1, concurrency=2)
    assert result.failures == 0 and sorted(p.mode for p in result.phases) == sorted(MODES)
    summary = result.summary()
    assert summary["retained_vs_off"] > 0 and summary["cpu_ms_per_pod"]["meshguard"]["webhook"] > 0
    # The webhook configurations were re-created as the chart made them, and meshguard answers them again.
    cluster.apply([pod("after")], "-n", namespaces[0])
    assert injected(cluster.kubectl_json("get", "pod", "after", "-n", namespaces[0]))

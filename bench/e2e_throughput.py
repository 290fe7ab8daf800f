"""Throughput retained: Pod creations per second a real kube-apiserver sustains with meshguard's webhooks called,
against the same API server without them, in the same run. A benchmark, not a test.

    .venv/bin/python -m bench.e2e_throughput [--pods 300] [--rounds 3] [--concurrency 8]

It starts the end-to-end harness's control plane (etcd, kube-apiserver, kube-controller-manager on loopback) and
meshguard with the Helm chart, exactly as ``pytest tests/e2e`` does. The workload is Online Boutique's frontend
pod as its ReplicaSet submits it (``generateName``), created ``--pods`` times per phase by ``--concurrency``
parallel clients over HTTPS with the admin certificate, in a namespace labeled ``meshguard.io/inject=enabled``
with a default-deny NetworkPolicy. Three modes:

* ``meshguard``: the chart's webhook configurations call meshguard: every pod is injected and checked;
* ``off``: the two webhook configurations deleted (and the API server seen to stop calling them);
* ``noop``: the same webhook configurations, but the server behind the URL is ``bench.noop`` (answers allowed,
  no patch): what any webhook costs, the floor meshguard's own cost sits on.

Each round runs every mode once, in a rotated order, so drift on a shared machine hits all of them; pods are
deleted between phases. Reported: median rates, their ratios, and CPU milliseconds per pod of every process,
which say where the time goes and are steadier than rates when the machine is shared. Results also go to
``bench/results/e2e-throughput-<timestamp>.json``.

Everything (client, etcd, API server, webhook server) shares this machine's cores, so the webhook's CPU is
taken from the API server's: pessimistic next to a cluster where the webhook runs on other nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.run import RESULTS, _cpu_seconds, boutique_pod
from tests.conftest import ROOT
from tests.e2e.cluster import ControlPlane, Meshguard, binaries, wait_for
from tests.e2e.objects import EXEMPT, MESH, network_policy, webhooks_answering

WEBHOOK_KINDS = ("mutatingwebhookconfiguration", "validatingwebhookconfiguration")
MODES = ("meshguard", "off", "noop")


@dataclass
class Batch:
    created: int
    seconds: float
    failures: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.created / self.seconds


async def _create(cluster: ControlPlane, namespace: str, body: bytes, count: int, concurrency: int,
                  on_created: Callable[[dict[str, Any]], None] | None) -> Batch:
    remaining = iter(range(count))
    failures: list[str] = []
    created = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal created
        for _ in remaining:
            response = await client.post(f"/api/v1/namespaces/{namespace}/pods", content=body,
                                         headers={"Content-Type": "application/json"})
            if response.status_code == 201:
                created += 1
                if on_created is not None:
                    on_created(response.json())
            else:
                failures.append(f"HTTP {response.status_code}: {response.text[:300]}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=cluster.api_url, verify=cluster.admin_ssl(), limits=limits,
                                 timeout=60) as client:
        await client.get("/readyz")  # connect once outside the timing
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return Batch(created, seconds, failures)


def create_pods(cluster: ControlPlane, namespace: str, pod: dict[str, Any], count: int, concurrency: int,
                on_created: Callable[[dict[str, Any]], None] | None = None) -> Batch:
    """Create ``count`` copies of ``pod`` (it needs ``generateName``) through the API; ``on_created`` gets each
    stored pod. Failures are collected, not raised."""
    return asyncio.run(_create(cluster, namespace, json.dumps(pod).encode(), count, concurrency, on_created))


class Modes:
    """Puts the cluster in one of :data:`MODES` and waits until the API server acts on it (it loads webhook
    configurations asynchronously). Deleted webhook configurations are re-created by the chart."""

    def __init__(self, cluster: ControlPlane, meshguard: Meshguard, probe_mesh: str, probe_plain: str) -> None:
        self.cluster = cluster
        self.meshguard = meshguard
        self.probes = (probe_mesh, probe_plain)
        self.noop: subprocess.Popen[bytes] | None = None

    def server_pid(self) -> int | None:
        """The process answering the webhooks now (None when they are off)."""
        if self.noop is not None:
            return self.noop.pid
        server = self.meshguard.server
        return server.process.pid if server is not None else None

    def switch(self, mode: str) -> None:
        self._stop_noop()
        if not self.meshguard.alive():
            self.meshguard.start()
        if mode == "off":
            self.cluster.kubectl("delete", *(f"{kind}/meshguard" for kind in WEBHOOK_KINDS), "--ignore-not-found")
            wait_for("the API server to stop calling meshguard",
                     lambda: webhooks_answering(self.cluster, *self.probes) == (False, False))
            return
        self.meshguard.install()  # Helm re-creates what was deleted, owning it as before (server-side apply)
        wait_for("the API server to call meshguard",
                 lambda: webhooks_answering(self.cluster, *self.probes) == (True, True))
        if mode == "noop":  # the same URL, certificate and webhook configurations; another server behind them
            self.meshguard.stop()
            self.noop = subprocess.Popen(
                [sys.executable, "-m", "bench.noop", "--cert-dir", str(self.meshguard.cert_dir),
                 "--port", str(self.meshguard.port)], cwd=ROOT)
            wait_for("the no-op webhook listening",
                     lambda: socket.create_connection(("127.0.0.1", self.meshguard.port), timeout=1).close() or True)

    def _stop_noop(self) -> None:
        if self.noop is not None:
            self.noop.terminate()
            self.noop.wait(30)
            self.noop = None

    def restore(self) -> None:
        """meshguard answering the chart's webhooks, as the suite expects."""
        self.switch("meshguard")


@dataclass
class Phase:
    mode: str
    rate: float
    failures: int
    cpu_ms_per_pod: dict[str, float]


@dataclass
class Result:
    pods: int
    concurrency: int
    phases: list[Phase]

    def rate(self, mode: str) -> float:
        return statistics.median(p.rate for p in self.phases if p.mode == mode)

    def cpu(self, mode: str, process: str) -> float:
        return statistics.median(p.cpu_ms_per_pod[process] for p in self.phases if p.mode == mode)

    @property
    def failures(self) -> int:
        return sum(p.failures for p in self.phases)

    @property
    def retained(self) -> float:
        return self.rate("meshguard") / self.rate("off")

    def summary(self) -> dict[str, Any]:
        processes = list(self.phases[0].cpu_ms_per_pod)
        return {
            "pods_per_phase": self.pods, "concurrency": self.concurrency, "failed_creations": self.failures,
            "pods_per_second": {m: round(self.rate(m), 1) for m in MODES},
            "retained_vs_off": round(self.retained, 3),
            "noop_vs_off": round(self.rate("noop") / self.rate("off"), 3),
            "meshguard_vs_noop": round(self.rate("meshguard") / self.rate("noop"), 3),
            "cpu_ms_per_pod": {m: {p: round(self.cpu(m, p), 2) for p in processes} for m in MODES},
        }


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (Go and Python servers run many) onto ``cpus``; threads started later inherit it."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


def _phase(cluster: ControlPlane, modes: Modes, mode: str, namespace: str, pod: dict[str, Any], count: int,
           concurrency: int, webhook_cpu: int | None = None) -> Phase:
    modes.switch(mode)
    pids = {name: c.process.pid for name, c in cluster.components.items() if c.process is not None}
    pids["client"] = os.getpid()
    server = modes.server_pid()
    if webhook_cpu is not None:  # the webhook on a core of its own, as on a cluster where it runs on other nodes
        others = set(range(os.cpu_count() or 1)) - {webhook_cpu}
        for pid in pids.values():
            _pin(pid, others)
        if server:
            _pin(server, {webhook_cpu})
    before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    webhook_before = _cpu_seconds(server) if server else 0.0
    batch = create_pods(cluster, namespace, pod, count, concurrency)
    cpu = {name: (_cpu_seconds(pid) - before[name]) * 1000 / count for name, pid in pids.items()}
    cpu["webhook"] = (_cpu_seconds(server) - webhook_before) * 1000 / count if server else 0.0
    # Unscheduled pods go at once; `kubectl delete --wait` would poll each for seconds.
    cluster.kubectl("delete", "pods", "--all", "-n", namespace, "--wait=false", timeout=300)
    wait_for("the phase's pods deleted", lambda: not cluster.kubectl_json("get", "pods", "-n", namespace)["items"],
             timeout=300)
    return Phase(mode, batch.rate, len(batch.failures), cpu)


def measure(cluster: ControlPlane, meshguard: Meshguard, namespaces: tuple[str, str, str], pods: int, rounds: int,
            concurrency: int, webhook_cpu: int | None = None) -> Result:
    """``rounds`` rounds of every mode, ``pods`` creations each, in ``namespaces[0]`` (mesh, covered by a
    NetworkPolicy); ``namespaces[1:]`` are the probes of :class:`Modes`. Leaves meshguard answering. With
    ``webhook_cpu``, the webhook server runs alone on that CPU and everything else on the others."""
    pod = boutique_pod()
    modes = Modes(cluster, meshguard, *namespaces[1:])
    phases: list[Phase] = []
    try:
        for index in range(rounds):
            for mode in MODES[index % len(MODES):] + MODES[:index % len(MODES)]:
                phases.append(_phase(cluster, modes, mode, namespaces[0], pod, pods, concurrency, webhook_cpu))
    finally:
        modes.restore()
    return Result(pods, concurrency, phases)


def prepare(cluster: ControlPlane) -> tuple[str, str, str]:
    """The benchmark namespace (mesh, a default-deny policy, the frontend's ServiceAccount) and the probes."""
    namespaces = {"bench-pods": MESH, "bench-probe-mesh": {**MESH, **EXEMPT}, "bench-probe-plain": {}}
    for name, labels in namespaces.items():
        cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}])
        wait_for(f"the default ServiceAccount of {name}", lambda n=name: cluster.kubectl(
            "get", "serviceaccount", "default", "-n", n, check=False).returncode == 0)
    cluster.apply([network_policy(), {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "frontend"}}],
                  "-n", "bench-pods")
    return tuple(namespaces)  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=300, help="pod creations per phase")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three modes")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel clients")
    parser.add_argument("--webhook-cpu", type=int, help="run the webhook server alone on this CPU, the rest on the "
                        "others (the webhook's CPU is then not taken from the API server's, as on a cluster)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshguard-e2e-bench-") as tmp:
        cluster = ControlPlane(binaries(), Path(tmp) / "cluster")
        try:
            cluster.start()
            mg = Meshguard(cluster, Path(tmp) / "meshguard")
            mg.install()
            mg.start()
            try:
                result = measure(cluster, mg, prepare(cluster), args.pods, args.rounds, args.concurrency,
                                 args.webhook_cpu)
            finally:
                mg.stop()
        finally:
            cluster.stop()
    summary = result.summary()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"e2e-throughput-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
    phases = [asdict(p) for p in result.phases]
    out.write_text(json.dumps({**summary, "webhook_cpu": args.webhook_cpu, "phases": phases}, indent=1))
    print(json.dumps(summary, indent=1))
    for phase in result.phases:
        print(f"{phase.mode:>9}: {phase.rate:6.1f} pods/s")
    print(f"throughput retained: {result.retained:.1%} of the rate without webhooks "
          f"({summary['noop_vs_off']:.1%} with a no-op webhook); {result.failures} failed creations; {out}")


if __name__ == "__main__":
    main()

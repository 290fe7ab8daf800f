"""Throughput retained: Pod creations per second a real kube-apiserver sustains with meshguard's webhooks called,
against the same API server with them removed, in the same run. A benchmark, not a test.

    .venv/bin/python -m bench.e2e_throughput [--pods 300] [--rounds 3] [--concurrency 8]

It starts the end-to-end harness's control plane (etcd, kube-apiserver, kube-controller-manager on loopback) and
meshguard with the Helm chart, exactly as ``pytest tests/e2e`` does. The workload is Online Boutique's frontend
pod as its ReplicaSet submits it (``generateName``), created ``--pods`` times by ``--concurrency`` parallel
clients over HTTPS with the admin certificate, in a namespace labeled ``meshguard.io/inject=enabled`` with a
default-deny NetworkPolicy: with the webhooks on, every creation is injected (``/mutate``) and checked
(``/validate``). Off means the two webhook configurations are deleted (and the API server seen to stop calling
them); on means they are re-created. Phases alternate (on, off, off, on, ...) so drift on a shared machine hits
both sides; pods are deleted between phases. The result is the ratio of the median rates.

Everything (client, API server, etcd, meshguard) shares this machine's cores, so meshguard's CPU time is paid
out of the API server's: a pessimistic setup compared to a cluster where the webhook runs on other nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import CORPUS
from tests.e2e.cluster import ControlPlane, Meshguard, binaries, wait_for
from tests.e2e.objects import EXEMPT, MESH, network_policy, webhooks_answering
from webhook import manifests, workloads

WEBHOOK_KINDS = ("mutatingwebhookconfiguration", "validatingwebhookconfiguration")


def frontend_pod() -> dict[str, Any]:
    """Online Boutique's frontend pod as the ReplicaSet controller submits it: generateName, no name."""
    objects = manifests.load([CORPUS / "online-boutique" / "kubernetes-manifests.yaml"])
    frontend = next(w for w in workloads.iter_workloads(objects, "shop") if w.name == "frontend")
    template = json.loads(json.dumps(frontend.template))
    template["metadata"]["generateName"] = "frontend-7d4d9c8f6b-"
    return {"apiVersion": "v1", "kind": "Pod", **template}


@dataclass
class Batch:
    created: int
    seconds: float
    failures: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.created / self.seconds


async def _create(cluster: ControlPlane, namespace: str, body: bytes, count: int, concurrency: int,
                  on_created: Callable[[dict[str, Any]], None] | None = None) -> Batch:
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


class Webhooks:
    """Switches meshguard's webhook configurations off (deleted) and on (re-created as the chart made them), and
    waits until the API server acts on it: it loads webhook configurations asynchronously."""

    def __init__(self, cluster: ControlPlane, probe_mesh: str, probe_plain: str) -> None:
        self.cluster = cluster
        self.probes = (probe_mesh, probe_plain)
        self.saved = [self._clean(cluster.kubectl_json("get", kind, "meshguard")) for kind in WEBHOOK_KINDS]

    @staticmethod
    def _clean(obj: dict[str, Any]) -> dict[str, Any]:
        for key in ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields"):
            obj["metadata"].pop(key, None)
        return obj

    def off(self) -> None:
        self.cluster.kubectl("delete", *(f"{kind}/meshguard" for kind in WEBHOOK_KINDS), "--ignore-not-found")
        wait_for("the API server to stop calling meshguard",
                 lambda: webhooks_answering(self.cluster, *self.probes) == (False, False))

    def on(self) -> None:
        self.cluster.apply(self.saved)
        wait_for("the API server to call meshguard",
                 lambda: webhooks_answering(self.cluster, *self.probes) == (True, True))


@dataclass
class Result:
    pods: int
    concurrency: int
    on: list[float]
    off: list[float]
    failures: int

    @property
    def retained(self) -> float:
        return statistics.median(self.on) / statistics.median(self.off)


def measure(cluster: ControlPlane, namespaces: tuple[str, str, str], pods: int, rounds: int,
            concurrency: int) -> Result:
    """Alternate on/off phases of ``pods`` creations in ``namespaces[0]`` (mesh, covered by a NetworkPolicy);
    ``namespaces[1:]`` are the probes of :class:`Webhooks` (a mesh namespace exempt from policy, and a plain one).
    Leaves the webhooks on."""
    bench_ns = namespaces[0]
    pod = frontend_pod()
    webhooks = Webhooks(cluster, *namespaces[1:])
    rates: dict[bool, list[float]] = {True: [], False: []}
    failures = 0
    try:
        for index in range(rounds * 2):
            enabled = index % 4 in (0, 3)  # on, off, off, on, on, off, ...
            (webhooks.on if enabled else webhooks.off)()
            batch = create_pods(cluster, bench_ns, pod, pods, concurrency)
            failures += len(batch.failures)
            rates[enabled].append(batch.rate)
            cluster.kubectl("delete", "pods", "--all", "-n", bench_ns, "--wait=true", timeout=300)
    finally:
        webhooks.on()
    return Result(pods, concurrency, rates[True], rates[False], failures)


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
    parser.add_argument("--rounds", type=int, default=3, help="on and off phases each")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel clients")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshguard-e2e-bench-") as tmp:
        cluster = ControlPlane(binaries(), Path(tmp) / "cluster")
        mg = Meshguard(cluster, Path(tmp) / "meshguard")
        try:
            cluster.start()
            mg.install()
            mg.start()
            namespaces = prepare(cluster)
            result = measure(cluster, namespaces, args.pods, args.rounds, args.concurrency)
        finally:
            mg.stop()
            cluster.stop()
    print(json.dumps({**asdict(result), "retained": round(result.retained, 4)}, indent=2))
    print(f"webhooks on:  {', '.join(f'{r:.1f}' for r in result.on)} pods/s")
    print(f"webhooks off: {', '.join(f'{r:.1f}' for r in result.off)} pods/s")
    print(f"throughput retained: {result.retained:.1%} (median on / median off), {result.failures} failed creations")


if __name__ == "__main__":
    main()

"""Control-plane convergence: from a cluster change to every proxy having acknowledged it.

    python -m bench.xds_convergence            # 1,000 proxies, 1,000 Services, 10,000 endpoints (several minutes)
    python -m bench.xds_convergence --quick    # 20 proxies, 20 Services: keeps the harness working in CI
    python -m bench.xds_convergence --envoy    # one of the proxies a real Envoy (root: a mount namespace)

``meshguard serve --dev --state DIR`` runs the control plane over a directory of Pods, Services, EndpointSlices
and the ServiceCIDR their ClusterIPs come from (``--no-service-cidr``: none, as before Kubernetes 1.33), a file
per Service and its EndpointSlice, followed like a watch: a change re-reads one small file; a second process
opens one delta ADS stream per simulated proxy, subscribes to clusters, endpoints and listeners as Envoy does,
and acknowledges every response. Each round makes three changes, an endpoint joining a Service (endpoints for
every proxy), a Service created (a cluster) and a meshed pod started (the outbound listener), each written to the
directory; convergence is taken from the server's ``meshguard_xds_convergence_seconds`` (from the change seen by
the store to each proxy's ACK of it) and, end to end, from the file write to the last proxy's response (which
includes up to half a second of the file source's polling, absent with the API server's watch). Also reported:
the control plane's resident memory after the initial sync and at peak, its CPU seconds per change (less what it
spends idle, measured first: keepalives and the directory's polling) and the simulated proxies' (their process
shares the machine: its work is not the control plane's).
With ``--envoy`` one of the proxies is the real Envoy with the injected bootstrap, its pod's files where the
control plane names them (a mount namespace of its own; its listeners bind this machine's proxy ports), and the
benchmark reports its resident memory with the whole configuration and whether it accepted every update.
Results go to ``bench/results/xds-<timestamp>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.run import _cpu_seconds, add_result_arguments, save_result
from tests.conftest import free_port
from webhook.xds.plane import CLUSTER, ENDPOINTS, LISTENER
from webhook.xds.server import SERVICE

NAMESPACES = 10
IDLE_SECONDS = 5.0
MESHED_IMAGE_CONTAINERS = [{"name": "app"}, {"name": "meshguard-proxy"}]


def _ip(index: int, base: int = 10) -> str:
    return f"{base}.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}"


def cluster_state(services: int, endpoints: int) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """Pods, and per Service its Service and EndpointSlice: ``endpoints`` pods each (every other pod meshed),
    spread over ``NAMESPACES`` namespaces."""
    pods, objects = [], []
    for s in range(services):
        namespace, name = f"ns-{s % NAMESPACES}", f"svc-{s}"
        addresses = []
        for e in range(endpoints):
            index = s * endpoints + e
            pod_name = f"{name}-{e}"
            meshed = index % 2 == 0
            pods.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": pod_name, "namespace": namespace, "labels": {"app": name}},
                         "spec": {"serviceAccountName": name,
                                  "containers": MESHED_IMAGE_CONTAINERS if meshed else [{"name": "app"}]},
                         "status": {"phase": "Running", "podIP": _ip(index)}})
            addresses.append({"addresses": [_ip(index)], "conditions": {"ready": True},
                              "targetRef": {"kind": "Pod", "name": pod_name, "namespace": namespace}})
        objects.append([
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
             "spec": {"clusterIP": _ip(s, 172), "ports": [{"name": "http", "port": 80 + s % 5}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": f"{name}-1", "namespace": namespace, "labels": {"kubernetes.io/service-name": name}},
             "ports": [{"name": "http", "port": 8080}], "endpoints": addresses}])
    return pods, objects


def write(directory: Path, name: str, objects: list[dict[str, Any]]) -> float:
    """Replace ``name`` in the state directory at once (a JSON List: quick to write and to read)."""
    partial = directory / f".{name}.partial"
    partial.write_bytes(orjson.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    os.replace(partial, directory / f"{name}.json")
    return time.time()


# --- the simulated proxies (a process of their own) --------------------------------------------------------------


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7


def _type_and_nonce(data: bytes) -> tuple[str, str]:
    """A DeltaDiscoveryResponse's type_url (field 4) and nonce (field 5), its other fields skipped unparsed."""
    found: dict[int, str] = {}
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 2:
            size, at = _varint(data, at)
            if number in (4, 5):
                found[number] = data[at:at + size].decode()
            at += size
        elif wire == 0:
            _, at = _varint(data, at)
        else:
            at += 8 if wire == 1 else 4
    return found.get(4, ""), found.get(5, "")


async def _proxy(address: str, namespace: str, pod: str, eds_names: list[str], log: list[tuple[str, str, float]],
                 ready: asyncio.Event) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from google.protobuf import struct_pb2

    metadata = struct_pb2.Struct()
    metadata.update({"namespace": namespace, "pod_name": pod})
    node = base_pb2.Node(id=f"sidecar~0.0.0.0~{pod}.{namespace}", metadata=metadata)
    # A receive window as large as Envoy's (its HTTP/2 default is 256 MiB; gRPC's own is 64 KiB, less than a listener
    # at this scale, so each would wait for a window update).
    options = [("grpc.max_receive_message_length", 1 << 30), ("grpc.http2.lookahead_bytes", 1 << 28)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        # Each response is read as far as its type and nonce: parsing the resources is each Envoy's own work, on
        # its own node, not the control plane's, and here it would take the control plane's CPU.
        call = channel.stream_stream(f"/{SERVICE}/DeltaAggregatedResources",
                                     request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
                                     response_deserializer=_type_and_nonce)()
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, node=node))
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINTS, resource_names_subscribe=eds_names))
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=LISTENER))
        seen: set[str] = set()
        async for type_url, nonce in call:
            log.append((pod, type_url, time.time()))
            await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce))
            seen.add(type_url)
            if len(seen) == 3:
                ready.set()


async def _clients(address: str, proxies: list[tuple[str, str]], eds_names: list[str], out: Path) -> None:
    log: list[tuple[str, str, float]] = []
    events = [asyncio.Event() for _ in proxies]
    tasks = [asyncio.create_task(_proxy(address, ns, pod, eds_names, log, event))
             for (ns, pod), event in zip(proxies, events, strict=True)]
    await asyncio.gather(*(event.wait() for event in events))
    print("SYNCED", flush=True)
    try:
        while True:  # dump the log whenever asked (a line on stdin)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            out.write_text(json.dumps(log))
            print("DUMPED", flush=True)
    finally:
        for task in tasks:
            task.cancel()


# --- a real Envoy among them --------------------------------------------------------------------------------------


class RealEnvoy:
    """The injected proxy of one meshed pod of the state, connected to the control plane in plaintext."""

    def __init__(self, work: Path, xds_port: int, namespace: str, pod: str, account: str) -> None:
        from tests.dataplane.tools import envoy_binary, in_pod_files, pod_mount_points, write_workload_certs
        from webhook import envoy
        from webhook.injection.settings import InjectionSettings

        self.made = pod_mount_points()
        options = InjectionSettings(xds_address=f"127.0.0.1:{xds_port}", xds_tls=False).bootstrap_options()
        certs = write_workload_certs(work / "ca", work / "envoy-certs", namespace, account)
        state = work / "envoy-state"
        envoy.write_sds_files(options.cert_dir, state / Path(options.sds_dir).name)
        values = {"POD_NAME": pod, "POD_NAMESPACE": namespace, "POD_IP": "127.0.0.1", "SERVICE_ACCOUNT": account}
        config = envoy.expand_pod_variables(envoy.render(options), values)
        self.admin = f"http://127.0.0.1:{options.admin_port}"
        argv = in_pod_files(certs, state, [envoy_binary(), "--config-yaml", config, "--concurrency", "1",
                                           "--base-id", str(os.getpid()), "--log-level", "warn"])
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=(work / "envoy.err").open("wb"))

    def stats(self) -> dict[str, int]:
        text = httpx.get(f"{self.admin}/stats", params={"filter": r"^(cluster_manager|listener_manager)\."},
                         timeout=10).text
        return {name: int(value) for name, value in (line.split(": ", 1) for line in text.splitlines())
                if value.strip().isdigit()}

    def rss_mib(self) -> float:
        return round(_rss_kib(self.process.pid)[0] / 1024, 1)  # unshare and sh exec into Envoy: one process

    def close(self) -> None:
        from tests.dataplane.tools import remove_mount_points

        self.process.terminate()
        self.process.wait(timeout=30)
        remove_mount_points(self.made)


# --- the driver ---------------------------------------------------------------------------------------------------


def _rss_kib(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _convergence(metrics: str) -> dict[str, float]:
    """Per type, the upper bound of the bucket holding the 99th percentile, the count, and the shares within 0.5 s
    and 1 s (bucket bounds)."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    for line in metrics.splitlines():
        if line.startswith("meshguard_xds_convergence_seconds_bucket"):
            labels, value = line.rsplit(" ", 1)
            kind = labels.split('type="')[1].split('"')[0]
            bound = labels.split('le="')[1].split('"')[0]
            buckets.setdefault(kind, []).append((float(bound), float(value)))
    result = {}
    for kind, rows in buckets.items():
        total = rows[-1][1]
        p99 = next(bound for bound, count in rows if count >= 0.99 * total)
        result[f"{kind}_p99_bucket_s"] = p99
        result[f"{kind}_acks"] = total
        for limit in (0.5, 1.0):
            within = next(count for bound, count in rows if bound >= limit)
            result[f"{kind}_share_within_{limit:g}s"] = round(within / total, 4)
    return result


def run(proxies: int, services: int, endpoints: int, changes: int, real_envoy: bool,
        service_cidr: bool = True) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="meshguard-xds-bench-"))
    work.chmod(0o755)  # the real Envoy reads its certificates below it
    state = work / "state"
    state.mkdir()
    pods, per_service = cluster_state(services, endpoints)
    write(state, "pods", pods)
    if service_cidr:  # the range every ClusterIP of the state comes from, as the API server has had since 1.33
        write(state, "servicecidr", [{"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                                      "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["172.0.0.0/8"]}}])
    for service, endpoint_slice in per_service:  # a file each: a change is read as one object's watch event is
        write(state, service["metadata"]["name"], [service, endpoint_slice])
    xds_port, health_port = free_port(), free_port()
    env = {**os.environ, "MESHGUARD_XDS__ENABLED": "true", "MESHGUARD_XDS__PORT": str(xds_port),
           "MESHGUARD_XDS__HOST": "127.0.0.1", "MESHGUARD_SERVER__PORT": str(free_port()),
           "MESHGUARD_SERVER__HEALTH_PORT": str(health_port), "MESHGUARD_SERVER__HEALTH_HOST": "127.0.0.1",
           "MESHGUARD_TLS__CERT_DIR": str(work / "certs"), "MESHGUARD_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "webhook", "serve", "--dev", "--state", str(state)], env=env,
                              stderr=(work / "server.err").open("wb"))
    clients = None
    proxy: RealEnvoy | None = None
    try:
        health = f"http://127.0.0.1:{health_port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{health}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"the control plane did not start: {(work / 'server.err').read_text()[-2000:]}")
            time.sleep(0.2)
        meshed = [p["metadata"] for i, p in enumerate(pods) if i % 2 == 0][:proxies]
        if real_envoy:  # the first meshed pod's proxy is Envoy, the others simulated
            first = pods[0]
            proxy = RealEnvoy(work, xds_port, first["metadata"]["namespace"], first["metadata"]["name"],
                              first["spec"]["serviceAccountName"])
            meshed = meshed[1:]
        eds_names = [f"outbound|{80 + s % 5}||svc-{s}.ns-{s % NAMESPACES}" for s in range(services)]
        spec = work / "clients.json"
        spec.write_text(json.dumps({"address": f"127.0.0.1:{xds_port}", "eds": eds_names,
                                    "proxies": [[m["namespace"], m["name"]] for m in meshed]}))
        log_path = work / "log.json"
        sync_start = time.time()
        clients = subprocess.Popen([sys.executable, "-m", "bench.xds_convergence", "--clients", str(spec),
                                    str(log_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert clients.stdout is not None and clients.stdin is not None
        assert clients.stdout.readline().strip() == "SYNCED"
        initial_sync = time.time() - sync_start
        rss_synced, _ = _rss_kib(server.pid)
        envoy_result: dict[str, Any] = {}
        if proxy is not None:
            wait_until = time.monotonic() + 120
            while proxy.stats().get("cluster_manager.active_clusters", 0) < services:
                if time.monotonic() > wait_until or proxy.process.poll() is not None:
                    errors = (work / "envoy.err").read_text()[-2000:]
                    raise SystemExit(f"Envoy did not take the configuration: {errors}")
                time.sleep(0.5)
            envoy_result["envoy_rss_after_sync_mib"] = proxy.rss_mib()
        # What the control plane spends with nothing changing (keepalives, the state directory's polling), so
        # that the CPU per change is the change's.
        idle_before, idle_start = _cpu_seconds(server.pid), time.monotonic()
        time.sleep(IDLE_SECONDS)
        idle_rate = (_cpu_seconds(server.pid) - idle_before) / (time.monotonic() - idle_start)
        cpu_before, clients_cpu_before = _cpu_seconds(server.pid), _cpu_seconds(clients.pid)
        changes_start = time.monotonic()
        writes: list[tuple[str, float]] = []
        for n in range(changes):
            # An endpoint joins a Service (EDS for every proxy); a Service is created (CDS); a meshed pod starts
            # (LDS: one more address in the outbound listener). Each undoes the last round's.
            service, endpoint_slice = per_service[0]
            grown = {**endpoint_slice, "endpoints": [*endpoint_slice["endpoints"], {
                "addresses": [_ip(1_000_000 + n)], "conditions": {"ready": True}}]}
            writes.append((ENDPOINTS, write(state, service["metadata"]["name"], [service, grown])))
            time.sleep(2)
            write(state, service["metadata"]["name"], [service, endpoint_slice])
            (state / f"new-{n - 1}.json").unlink(missing_ok=True)
            extra = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"new-{n}", "namespace": "ns-0"},
                     "spec": {"clusterIP": _ip(500_000 + n, 172), "ports": [{"name": "http", "port": 80}]}}
            writes.append((CLUSTER, write(state, f"new-{n}", [extra])))
            time.sleep(2.5)
            (state / f"pod-{n - 1}.json").unlink(missing_ok=True)
            started = {**pods[0], "metadata": {**pods[0]["metadata"], "name": f"started-{n}"},
                       "status": {"phase": "Running", "podIP": _ip(2_000_000 + n)}}
            writes.append((LISTENER, write(state, f"pod-{n}", [started])))
            time.sleep(3)
        # The idle rate is itself measured: a change costing less than its error (a --quick run's 20 proxies) would
        # come out below zero, and reads as nothing.
        cpu_per_change = max(0.0, (_cpu_seconds(server.pid) - cpu_before
                                   - idle_rate * (time.monotonic() - changes_start)) / len(writes))
        clients_cpu_per_change = (_cpu_seconds(clients.pid) - clients_cpu_before) / len(writes)
        clients.stdin.write("\n")
        clients.stdin.flush()
        assert clients.stdout.readline().strip() == "DUMPED"
        log = json.loads(log_path.read_text())
        end_to_end = []
        for (type_url, written), following in zip(writes, [*writes[1:], (None, float("inf"))], strict=True):
            times = {}
            for pod, kind, at in log:
                if kind == type_url and written <= at < following[1]:
                    times.setdefault(pod, at)
            if len(times) == len(meshed):
                end_to_end.append(max(times.values()) - written)
        rss, peak = _rss_kib(server.pid)
        metrics = httpx.get(f"{health}/metrics", timeout=10).text
        if proxy is not None:
            stats = proxy.stats()
            envoy_result |= {
                "envoy_rss_mib": proxy.rss_mib(), "envoy_clusters": stats.get("cluster_manager.active_clusters"),
                "envoy_updates_rejected": sum(v for k, v in stats.items() if k.endswith("update_rejected")),
                "envoy_cds_updates": stats.get("cluster_manager.cds.update_success"),
                "envoy_lds_updates": stats.get("listener_manager.lds.update_success"),
            }
        return {
            "proxies": len(meshed), "services": services, "endpoints": services * endpoints,
            "initial_sync_s": round(initial_sync, 2),
            "rss_after_sync_mib": round(rss_synced / 1024, 1), "rss_mib": round(rss / 1024, 1),
            "rss_peak_mib": round(peak / 1024, 1), "cpu_s_per_change": round(cpu_per_change, 3),
            "idle_cpu_share": round(idle_rate, 3),
            "simulated_proxies_cpu_s_per_change": round(clients_cpu_per_change, 3),
            "changes": len(writes), "changes_seen_by_every_proxy": len(end_to_end),
            "file_write_to_last_proxy_max_s": round(max(end_to_end), 3) if end_to_end else None,
            **_convergence(metrics), **envoy_result,
        }
    finally:
        if proxy is not None:
            proxy.close()
        if clients is not None:
            clients.kill()
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_result_arguments(parser, "20 proxies and 20 Services of 2 endpoints")
    parser.add_argument("--proxies", type=int, default=1000)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints per Service")
    parser.add_argument("--changes", type=int, default=3, help="rounds of (an endpoint, a Service, a pod) changes")
    parser.add_argument("--envoy", action="store_true", help="one of the proxies a real Envoy (root)")
    parser.add_argument("--no-service-cidr", action="store_true",
                        help="no ServiceCIDR, as an API server before 1.33: every ClusterIP in the listener")
    parser.add_argument("--clients", nargs=2, metavar=("SPEC", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients:
        spec = json.loads(Path(args.clients[0]).read_text())
        asyncio.run(_clients(spec["address"], [tuple(p) for p in spec["proxies"]], spec["eds"],
                             Path(args.clients[1])))
        return
    if args.quick:
        args.proxies, args.services, args.endpoints, args.changes = 20, 20, 2, 1
    result = run(args.proxies, args.services, args.endpoints, args.changes, args.envoy, not args.no_service_cidr)
    result["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    save_result(result, args.out, "xds")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""What one mutual-TLS hop through meshguard's proxies costs: requests per second and latency, against the same
requests in plaintext between the same two network namespaces. A benchmark, not a test.

    .venv/bin/python -m bench.dataplane [--seconds 10] [--connections 16] [--rounds 3]   (as root)

It builds the data-plane tests' topology (tests/dataplane: a client and a server namespace on a bridge), runs
``meshguard netinit`` and Envoy in each exactly as injected (STRICT, static bootstrap, the server in the mesh
ranges, one worker thread per Envoy: ``--concurrency 1``), and an app in the server namespace that answers every
request itself: a third Envoy with a direct response, listening on two ports. wrk (one thread) runs in the client
namespace and calls:

* ``mtls``: the app's captured port: client app → client proxy (outbound) → mutual TLS → server proxy (inbound)
  → app, what every meshed call does;
* ``plaintext``: the app's other port, excluded from capture both ways: client → app directly.

Each round runs both, in turn; reported are the medians of requests/s and of wrk's p50 and p99 latency, the
ratio of mTLS to plaintext throughput and the latency the hop adds. Everything shares this machine's cores (wrk,
both proxies and the app): a proxy's worker competes with the others for CPU. So the CPU each proxy and the app
spend per request is measured too (from /proc), and from it what a core would carry through each process. The
one-core ratio compares the app with the busier proxy **in the same mTLS run**, where all three handle the same
requests at the same rate under the same contention: a process's CPU per request falls as its load rises (fewer
wake-ups, more events per wake-up), so setting the proxies' cost in the mTLS run against the app's at its own
saturation (the plaintext run) would credit only the app with what a busy core saves. Results also go to
``bench/results/dataplane-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.run import _cpu_seconds, add_result_arguments, save_result
from tests.dataplane.conftest import CLIENT_ID, CLIENT_IP, MESH_CIDRS, SERVER_ID, SERVER_IP, Lab, Pod, start_pod
from tests.dataplane.tools import envoy_binary
from tests.e2e.cluster import wait_for
from webhook.injection.settings import InjectionSettings

MTLS_PORT, PLAIN_PORT = 9000, 9001
APP_UID = 1000


def _app_config() -> str:
    """An Envoy that answers ``200 ok`` on both ports, the fastest app there is to put behind a proxy."""
    route = {"virtual_hosts": [{"name": "app", "domains": ["*"], "routes": [{"match": {"prefix": "/"},
             "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]}
    manager = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "app", "route_config": route, "http_filters": [{"name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}
    listeners = [{"name": f"app-{port}", "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
                  "filter_chains": [{"filters": [manager]}]} for port in (MTLS_PORT, PLAIN_PORT)]
    return json.dumps({"static_resources": {"listeners": listeners},
                       "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 19000}}}})


_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_ERRORS = re.compile(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)")


def _wrk(client: Pod, port: int, seconds: int, connections: int) -> dict[str, float]:
    out = client.run("wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                     f"http://{SERVER_IP}:{port}/", timeout=seconds + 60).stdout
    errors = _ERRORS.search(out)
    if errors:
        raise RuntimeError(f"wrk saw errors on port {port}: {errors.group(0)}\n{out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    latency = {f"p{q}_ms": float(v) * scale[unit] for q, v, unit in _LATENCY.findall(out)}
    rate = _RATE.search(out)
    if rate is None or set(latency) != {"p50_ms", "p99_ms"}:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return {"requests_per_second": float(rate.group(1)), **latency}


def _measured(lab: Lab, client: Pod, port: int, seconds: int, connections: int) -> dict[str, float]:
    """wrk's figures, and the CPU each proxy and the app spent per request meanwhile (microseconds)."""
    watched = {label.replace("/", "_"): process.pid for label, process in lab.processes}
    before = {label: _cpu_seconds(pid) for label, pid in watched.items()}
    figures = _wrk(client, port, seconds, connections)
    requests = figures["requests_per_second"] * seconds
    return figures | {f"{label}_cpu_us_per_request": (_cpu_seconds(pid) - before[label]) / requests * 1e6
                      for label, pid in watched.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    add_result_arguments(parser, "1 s per path, one round (harness smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.connections = 1, 1, 4
    workdir = Path(tempfile.mkdtemp(prefix="meshguard-bench-dataplane-"))
    workdir.chmod(0o755)  # Envoy (uid 1337) reads the certificates below it
    lab = Lab(workdir)
    runs: dict[str, list[dict[str, float]]] = {"plaintext": [], "mtls": []}
    try:
        lab.build_switch()
        client = Pod(lab, "client", lab.netns("client"))
        server = Pod(lab, "server", lab.netns("server"))
        lab.plug(client, f"{CLIENT_IP}/24")
        lab.plug(server, f"{SERVER_IP}/24")
        settings = InjectionSettings(mtls_mode="STRICT", mesh_cidrs=MESH_CIDRS, exclude_inbound_ports=(PLAIN_PORT,),
                                     exclude_outbound_ports=(PLAIN_PORT,))
        server.start("app", envoy_binary(), "--config-yaml", _app_config(), "--concurrency", "1",
                     "--disable-hot-restart", "--base-id", "7", "--log-level", "warn", uid=APP_UID)
        wait_for("the app", lambda: server.get(f"http://127.0.0.1:{PLAIN_PORT}/")[0])
        ca_dir = workdir / "mesh-ca"
        for pod, ip, identity in ((server, SERVER_IP, SERVER_ID), (client, CLIENT_IP, CLIENT_ID)):
            start_pod(lab, pod, ip, settings, identity, ca_dir, ("--concurrency", "1"))
        for port in (MTLS_PORT, PLAIN_PORT):  # warm both paths up
            _wrk(client, port, 2, args.connections)
        for index in range(args.rounds):
            order = [("mtls", MTLS_PORT), ("plaintext", PLAIN_PORT)]
            for name, port in order if index % 2 == 0 else order[::-1]:
                runs[name].append(_measured(lab, client, port, args.seconds, args.connections))
        assert server.stats().get("cluster.inbound|local.upstream_cx_total", 0) > 0  # the mTLS runs went through it
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for name, results in runs.items()}
    plain, mtls = medians["plaintext"], medians["mtls"]
    # What one core would carry through each proxy, from its CPU per request: the throughput a proxy with a core
    # of its own sustains, which this machine cannot show directly.
    one_core = {role: 1e6 / mtls[f"{role}_envoy_cpu_us_per_request"] for role in ("client", "server")}
    # Per round, the app's CPU per request over the busier proxy's, both from the same mTLS run.
    same_run = [run["server_app_cpu_us_per_request"]
                / max(run["client_envoy_cpu_us_per_request"], run["server_envoy_cpu_us_per_request"])
                for run in runs["mtls"]]
    report: dict[str, Any] = {
        "seconds": args.seconds, "connections": args.connections, "rounds": args.rounds, "runs": runs,
        "medians": medians, "throughput_ratio": mtls["requests_per_second"] / plain["requests_per_second"],
        "proxy_one_core_requests_per_second": one_core,
        "app_over_proxy_cpu_per_round": same_run,
        # With a core each, the path carries what its costliest process does: never more than the app alone.
        "one_core_ratio": min(1.0, statistics.median(same_run)),
        "added_p50_ms": mtls["p50_ms"] - plain["p50_ms"], "added_p99_ms": mtls["p99_ms"] - plain["p99_ms"],
        "at": dt.datetime.now(dt.UTC).isoformat()}
    out = save_result(report, args.out, "dataplane")
    for name, figures in medians.items():
        print(f"{name:9} {figures['requests_per_second']:8.0f} req/s  p50 {figures['p50_ms']:.3f} ms  "
              f"p99 {figures['p99_ms']:.3f} ms")
    print(f"mTLS/plaintext throughput {report['throughput_ratio']:.2f}; added p50 {report['added_p50_ms']:.3f} ms, "
          f"p99 {report['added_p99_ms']:.3f} ms")
    for role, rate in one_core.items():
        print(f"{role} proxy: {mtls[f'{role}_envoy_cpu_us_per_request']:.1f} us CPU per request, "
              f"{rate:.0f} req/s on one core")
    print(f"app: {mtls['server_app_cpu_us_per_request']:.1f} us CPU per request in the mTLS run, "
          f"{plain['server_app_cpu_us_per_request']:.1f} in the plaintext run")
    print(f"app / busier proxy CPU per request, same run: {', '.join(f'{r:.2f}' for r in same_run)}; one core "
          f"each, mTLS / plaintext throughput {report['one_core_ratio']:.2f}")
    print(f"results: {out}")


if __name__ == "__main__":
    main()

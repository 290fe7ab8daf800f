"""Throughput and latency of meshguard's admission endpoints against a no-op floor, driven by wrk over HTTPS.

    python -m bench.run                 # full run (about 4 minutes: 3 rounds of 6 cases of 10 s)
    python -m bench.run --quick         # a few seconds per case: keeps the harness working in CI

Each case runs wrk twice against a server started here: sequentially (1 connection) for latency, and at
saturation (16 connections) for throughput. The server is one process with one uvicorn worker, as in the
targets; wrk runs with one thread on the other core. Results go to ``bench/results/<timestamp>.json`` and a
table is printed. CPU seconds used by the server and by wrk are reported for every case, so it is visible
which side was saturated.

On a shared machine the speed of everything drifts by tens of percent within minutes, so the cases run in
``--rounds`` rounds (each in a rotated order): a ratio is taken between the floor and meshguard measured in
the same round, and the reported figures are medians over the rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from tests.conftest import CORPUS, free_port, review
from webhook import certs, manifests, workloads

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def add_result_arguments(parser: argparse.ArgumentParser, quick: str) -> None:
    """``--quick`` (what the test suite's smoke run uses: ``quick`` says what it shrinks to) and ``--out``."""
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, help="write the result here (default bench/results/<name>-<time>.json)")


def save_result(result: dict[str, Any], out: Path | None, name: str) -> Path:
    """Write ``result`` as JSON to ``out``, or to ``bench/results/<name>-<UTC time>.json``."""
    path = out or RESULTS / f"{name}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "errors": %d, "non2xx": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass
class Case:
    round: int
    name: str
    target: str
    path: str
    connections: int
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    server_cpu_s: float
    wrk_cpu_s: float


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else 0.0


def boutique_pod() -> dict[str, Any]:
    """The frontend Deployment's pod as the ReplicaSet controller submits it: generateName, no name."""
    objects = manifests.load([CORPUS / "online-boutique" / "kubernetes-manifests.yaml"])
    frontend = next(w for w in workloads.iter_workloads(objects, "shop") if w.name == "frontend")
    template = json.loads(json.dumps(frontend.template))
    template["metadata"]["generateName"] = "frontend-7d4d9c8f6b-"
    return {"apiVersion": "v1", "kind": "Pod", **template}


def boutique_deployment() -> dict[str, Any]:
    objects = manifests.load([CORPUS / "online-boutique" / "kubernetes-manifests.yaml"])
    return next(o for o in objects if o.get("kind") == "Deployment" and o["metadata"]["name"] == "frontend")


def write_state(path: Path, namespaces: int, policies: int) -> None:
    """``namespaces`` mesh-enabled namespaces holding ``policies`` NetworkPolicies between them, round robin."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": f"ns-{i:04d}", "labels": {"meshguard.io/inject": "enabled"}}}
        for i in range(namespaces)
    ]
    for i in range(policies):
        docs.append({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"np-{i:05d}", "namespace": f"ns-{i % namespaces:04d}"},
            "spec": {"podSelector": {"matchLabels": {"app": f"svc-{i}"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": f"client-{i}"}}}]}]},
        })
    # The benchmarked namespace also has the policy that covers the benchmarked workload.
    docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": {"name": "frontend", "namespace": "ns-0042"},
                 "spec": {"podSelector": {"matchLabels": {"app": "frontend"}}, "policyTypes": ["Ingress"]}})
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


class Server:
    def __init__(self, name: str, argv: list[str], port: int, health_port: int | None, log: Path) -> None:
        self.name, self.port = name, port
        self.health_port = health_port
        self.log = log
        self.process = subprocess.Popen(argv, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def wait(self, ca: Path, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-2000:]}")
            try:
                if self.health_port:
                    ok = httpx.get(f"http://127.0.0.1:{self.health_port}/readyz", timeout=1).status_code == 200
                else:
                    ok = httpx.post(f"https://127.0.0.1:{self.port}/", content=orjson.dumps(review({})),
                                    verify=_ctx(ca), timeout=1).status_code == 200
                if ok:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _ctx(ca: Path) -> Any:
    import ssl

    return ssl.create_default_context(cafile=str(ca))


def run_wrk(url: str, body: Path, lua: Path, connections: int, seconds: float) -> tuple[dict[str, Any], float]:
    env = {**os.environ, "BENCH_BODY": str(body)}
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(lua), url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    # wrk's own CPU time, read from the kernel's accounting of the finished child.
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read() if proc.stdout else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    match = re.search(r"^RESULT (.*)$", out, re.M)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed:\n{out}")
    return json.loads(match.group(1)), usage.ru_utime + usage.ru_stime


def measure(round_: int, name: str, server: Server, path: str, body: Path, lua: Path, connections: int,
            seconds: float) -> Case:
    before = _cpu_seconds(server.process.pid)
    result, wrk_cpu = run_wrk(f"https://127.0.0.1:{server.port}{path}", body, lua, connections, seconds)
    server_cpu = _cpu_seconds(server.process.pid) - before
    duration = result["duration_us"] / 1e6
    return Case(
        round=round_, name=name, target=server.name, path=path, connections=connections,
        requests_per_s=round(result["requests"] / duration, 1),
        p50_ms=result["p50_us"] / 1000, p90_ms=result["p90_us"] / 1000, p99_ms=result["p99_us"] / 1000,
        max_ms=result["max_us"] / 1000, errors=result["errors"] + result["non2xx"],
        server_cpu_s=round(server_cpu, 2), wrk_cpu_s=round(wrk_cpu, 2),
    )


def medians(cases: list[Case]) -> dict[str, dict[str, float]]:
    """Per case and connection count (``mutate c16``): the median over the rounds of rate and latencies."""
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(f"{case.name} c{case.connections}", []).append(case)
    fields = ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms")
    return {key: {f: round(statistics.median(getattr(c, f) for c in group), 3) for f in fields}
            for key, group in groups.items()}


def ratio(cases: list[Case], name: str) -> float:
    """Median over the rounds of ``name``'s saturation rate divided by the floor's in the same round."""
    saturated = {(c.round, c.name): c.requests_per_s for c in cases if c.connections == 16}
    rounds = sorted({r for r, _ in saturated})
    return round(statistics.median(saturated[r, name] / saturated[r, "noop"] for r in rounds), 3)


def check_answer(url: str, body: Path, ca: Path, expect: str) -> None:
    """Make sure the benchmarked request gets the real answer, not an error that happens to be fast."""
    data = httpx.post(url, content=body.read_bytes(), verify=_ctx(ca), timeout=5).json()["response"]
    got = "patched" if data.get("patch") else ("allowed" if data["allowed"] else "denied")
    if got != expect:
        raise RuntimeError(f"{url} answered {got} ({data}), expected {expect}")


@dataclass
class Setup:
    """What every benchmark here needs: a work directory with certificates, the wrk script, the request bodies
    (``<work>/mutate.json``, ``<work>/validate.json``) and a state directory, and a way to start both servers."""

    work: Path
    ca: Path
    lua: Path

    @classmethod
    def create(cls, namespaces: int, policies: int) -> Setup:
        work = Path(tempfile.mkdtemp(prefix="meshguard-bench-"))
        certs.generate_serving(work / "certs", "meshguard", "meshguard", dev=True)
        lua = work / "post.lua"
        lua.write_text(LUA)
        bodies = {
            "mutate": review(boutique_pod(), namespace="ns-0042"),
            "validate": review(boutique_deployment(), namespace="ns-0042"),
        }
        for name, data in bodies.items():
            (work / f"{name}.json").write_bytes(orjson.dumps(data))
        (work / "state").mkdir()
        write_state(work / "state" / "cluster.yaml", namespaces=namespaces, policies=policies)
        return cls(work, work / "certs" / certs.CA_CERT, lua)

    def noop(self, wrapper: tuple[str, ...] = ()) -> Server:
        """Start the no-op floor; ``wrapper`` prefixes the command (a profiler, valgrind)."""
        port = free_port()
        return Server("noop", [*wrapper, sys.executable, "-m", "bench.noop", "--cert-dir", str(self.work / "certs"),
                               "--port", str(port)], port, None, self.work / "noop.log")

    def meshguard(self, wrapper: tuple[str, ...] = ()) -> Server:
        """Start meshguard with the state directory; ``wrapper`` prefixes the command."""
        port, health = free_port(), free_port()
        config = self.work / "config.yaml"
        config.write_text(yaml.safe_dump({"server": {"host": "127.0.0.1", "port": port, "health_host": "127.0.0.1",
                                                     "health_port": health},
                                          "tls": {"cert_dir": str(self.work / "certs")}}))
        argv = [*wrapper, sys.executable, "-m", "webhook", "serve", "--dev", "--config", str(config),
                "--state", str(self.work / "state")]
        return Server("meshguard", argv, port, health, self.work / "meshguard.log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 s per case (harness smoke test)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every case (--quick: 1)")
    parser.add_argument("--out", type=Path, help="result file (default bench/results/<timestamp>.json)")
    args = parser.parse_args(argv)
    seconds = 1.0 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    setup = Setup.create(namespaces=100 if args.quick else 1000, policies=1000 if args.quick else 10000)
    work, ca, lua = setup.work, setup.ca, setup.lua
    noop, meshguard = setup.noop(), setup.meshguard()
    port = meshguard.port
    cases: list[Case] = []
    try:
        noop.wait(ca)
        meshguard.wait(ca)
        check_answer(f"https://127.0.0.1:{port}/mutate", work / "mutate.json", ca, "patched")
        check_answer(f"https://127.0.0.1:{port}/validate", work / "validate.json", ca, "allowed")
        plan = [
            ("noop", noop, "/", "mutate"),
            ("mutate", meshguard, "/mutate", "mutate"),
            ("validate", meshguard, "/validate", "validate"),
        ]
        for index in range(rounds):
            for name, server, path, body in plan[index % len(plan):] + plan[:index % len(plan)]:
                for connections in (1, 16):
                    case = measure(index, name, server, path, work / f"{body}.json", lua, connections, seconds)
                    cases.append(case)
                    print(f"{index} {case.name:9} c={connections:<3} {case.requests_per_s:9.0f} req/s"
                          f"  p50 {case.p50_ms:.3f} ms  p99 {case.p99_ms:.3f} ms  max {case.max_ms:.2f} ms"
                          f"  errors {case.errors}  cpu server {case.server_cpu_s} s / wrk {case.wrk_cpu_s} s",
                          flush=True)
        rss = _rss_mb(meshguard.process.pid)
    finally:
        noop.stop()
        meshguard.stop()
    summary = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "seconds_per_case": seconds,
        "rounds": rounds,
        "cases": [asdict(c) for c in cases],
        "medians": medians(cases),
        **{f"{name}_to_noop_ratio": ratio(cases, name) for name in ("mutate", "validate")},
        "meshguard_rss_mb": round(rss, 1),
    }
    for key, median in summary["medians"].items():
        print(f"median {key:12} {median['requests_per_s']:9.0f} req/s  p50 {median['p50_ms']:.3f} ms"
              f"  p99 {median['p99_ms']:.3f} ms")
    print(f"mutate/noop throughput ratio {summary['mutate_to_noop_ratio']}, "
          f"validate/noop {summary['validate_to_noop_ratio']} (medians of the rounds' ratios), "
          f"meshguard RSS {summary['meshguard_rss_mb']} MB")
    out = args.out or RESULTS / f"{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if any(c.errors for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())

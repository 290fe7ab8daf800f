"""Shared fixtures: a real meshguard server process over HTTPS on loopback, and AdmissionReview builders."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from hypothesis import HealthCheck, settings

# Examples are judged on what they find, never on how fast this machine runs them: a loaded 2-core CI machine
# must not fail a property test on a per-example deadline or a generation-speed health check.
settings.register_profile("meshguard", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("meshguard")

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fixtures" / "corpus"


# Tests under these folders get the marker of the same name (the suites that drive a real cluster).
_FOLDER_MARKERS = ("e2e", "node")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for name in _FOLDER_MARKERS:
            if f"tests/{name}/" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, name))


def run_folder(root: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh folder for this session's logs under ``root`` (one per run, so concurrent runs never share one),
    for a session fixture to ``yield from``: kept when a test failed, removed otherwise."""
    path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    path.mkdir(parents=True)
    yield path
    if request.session.testsfailed == 0:
        shutil.rmtree(path, ignore_errors=True)
    else:
        print(f"\nlogs kept in {path}")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-skips", action="store_true", default=os.environ.get("MESHGUARD_NO_SKIPS") == "1",
                     help="fail the run if any test was skipped (CI sets it: everything it should run must run)")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not session.config.getoption("--no-skips") or reporter is None:
        return
    skipped = [r for r in reporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    if skipped:
        reporter.write_line(f"--no-skips: {len(skipped)} test(s) were skipped; CI must run them all", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_injected(pod: dict[str, Any], namespace: str = "shop", settings: Any = None) -> dict[str, Any]:
    """``pod`` as the API server stores it after meshguard's ``/mutate``: the real injection patch, applied."""
    import copy

    import jsonpatch

    from webhook.injection.patch import plan
    from webhook.injection.settings import InjectionSettings
    from webhook.workloads import as_workload

    obj = copy.deepcopy(pod)
    outcome = plan(as_workload(obj, namespace), settings or InjectionSettings(), "meshguard")
    assert outcome.decision.inject, outcome.decision
    return jsonpatch.apply_patch(obj, [dict(op) for op in outcome.ops])


def review(obj: dict[str, Any] | None, *, operation: str = "CREATE", namespace: str = "default",
           kind: str | None = None, old: dict[str, Any] | None = None, dry_run: bool = False,
           uid: str | None = None, user: str = "kubernetes-admin", sub_resource: str | None = None) -> dict[str, Any]:
    """An AdmissionReview v1 request the way kube-apiserver sends it."""
    kind = kind or (obj or old or {}).get("kind", "Pod")
    group, version = "", "v1"
    api_version = (obj or old or {}).get("apiVersion", "v1")
    if "/" in api_version:
        group, version = api_version.split("/", 1)
    resource = kind.lower() + ("es" if kind.endswith("s") else "s")
    meta = (obj or old or {}).get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid or str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "requestKind": {"group": group, "version": version, "kind": kind},
            "requestResource": {"group": group, "version": version, "resource": resource},
            "name": meta.get("name", ""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": user, "groups": ["system:authenticated"]},
            **({"subResource": sub_resource} if sub_resource else {}),
            "object": obj,
            "oldObject": old,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    url: str
    health_url: str
    cert_dir: Path
    log_path: Path

    @property
    def ca(self) -> str:
        return str(self.cert_dir / "ca.crt")

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=ssl.create_default_context(cafile=self.ca), timeout=10, **kwargs)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_entries(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.logs().splitlines() if line.startswith("{")]

    def admission_log(self, uid: str, timeout: float = 10) -> dict[str, Any]:
        """The one admission log line for ``uid``, waiting for the server to write it (lines are batched)."""
        deadline = time.monotonic() + timeout
        while True:
            entries = [e for e in self.log_entries() if e.get("msg") == "admission" and e.get("uid") == uid]
            if entries or time.monotonic() > deadline:
                assert len(entries) == 1, f"expected one admission line for {uid}, got {entries}"
                return entries[0]
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(workdir: Path, config: dict[str, Any] | None = None, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, wait_ready: bool = True, dev: bool = True) -> RunningServer:
    """Start ``meshguard serve`` as a real process on free loopback ports and wait until it is ready.

    ``dev`` runs it with ``--dev`` (no cluster); without it the server uses the live API (``KUBECONFIG`` in
    ``env``), with loopback certificates made here.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    cert_dir = workdir / "certs"
    port, health = free_port(), free_port()
    cfg: dict[str, Any] = {"server": {"host": "127.0.0.1", "port": port, "health_host": "127.0.0.1",
                                      "health_port": health}, "tls": {"cert_dir": str(cert_dir)}}
    for key, value in (config or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    cert_dir = Path(cfg["tls"]["cert_dir"])
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    log_path = workdir / "server.log"
    if not dev and not (cert_dir / "tls.crt").exists():
        from webhook.certs import generate_serving

        generate_serving(cert_dir, "meshguard", "meshguard", dev=True)
    mode = ("--dev",) if dev else ()
    process = subprocess.Popen(
        [sys.executable, "-m", "webhook", "serve", *mode, "--config", str(config_file), *args],
        cwd=ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    server = RunningServer(process, f"https://127.0.0.1:{port}", f"http://127.0.0.1:{health}", cert_dir, log_path)
    if wait_ready:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"meshguard exited with {process.returncode}:\n{server.logs()}")
            try:
                if httpx.get(f"{server.health_url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                server.stop(signal.SIGKILL)
                raise RuntimeError(f"meshguard not ready in 30 s:\n{server.logs()}")
            time.sleep(0.05)
    return server


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start servers with ``server_factory(config=..., args=...)``; all are stopped at the end of the test."""
    started: list[RunningServer] = []

    def factory(config: dict[str, Any] | None = None, args: tuple[str, ...] = (), **kwargs: Any) -> RunningServer:
        server = start_server(tmp_path / f"server{len(started)}", config, args, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server with default settings shared by a test module."""
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    running.stop(signal.SIGKILL)

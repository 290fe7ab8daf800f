"""A tiny cluster network made of network namespaces: two meshed pods and a host outside the mesh.

Every host gets a veth into a private "switch" namespace holding a bridge, so nothing is added to the machine's
own network namespace and traffic only ever flows between our namespaces (addresses in 10.213.0.0/24 and
fd00:213::/64, assigned only here). Each pod runs what the injector would give it: ``meshguard netinit`` with the
init container's arguments, then Envoy (as uid 1337) with the sidecar's arguments and a workload certificate from
``meshguard certs workload``, next to a small HTTP app. Teardown kills every process and deletes every namespace,
whatever happened in between.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.dataplane.tools import envoy_binary, localize, run_init_container, write_workload_certs
from tests.pcap import Segment, read_pcap
from webhook import envoy
from webhook.injection import spec
from webhook.injection.decision import INIT_NAME, PROXY_NAME
from webhook.injection.settings import InjectionSettings

PROXY_UID = 1337
APP_PORT = 8080
BYPASS_PORT = 9090  # excluded from capture in both directions
CLIENT_IP, SERVER_IP, OUTSIDE_IP, OUTSIDE_EXCLUDED_IP = "10.213.0.2", "10.213.0.3", "10.213.0.5", "10.213.0.4"
CLIENT_IP6, SERVER_IP6 = "fd00:213::2", "fd00:213::3"
# The two pods (and only they) are the mesh: .2/31 is exactly .2 and .3.
MESH_CIDRS = ("10.213.0.2/31", "fd00:213::/64")
CLIENT_ID = ("shop", "frontend")  # namespace, service account
SERVER_ID = ("shop", "backend")
WAIT_SECONDS = 60

# Run inside a namespace by the test's Python: one HTTP GET, the body on stdout; exit 1 with the error otherwise.
_FETCH = """
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode(), end="")
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}", end="")
    sys.exit(1)
"""


def _run(argv: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def _wait(what: str, probe: Any, seconds: float = WAIT_SECONDS) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {seconds}s waiting for {what}")
        time.sleep(0.2)


@dataclass
class Host:
    """A network namespace standing for a pod or a machine."""

    lab: Lab
    role: str
    name: str

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return _run(["ip", "netns", "exec", self.name, *argv], timeout=timeout, check=check)

    def start(self, label: str, *argv: str, uid: int | None = None) -> subprocess.Popen[bytes]:
        return self.lab.start(self, label, list(argv), uid)

    def get(self, url: str) -> tuple[bool, str]:
        """(succeeded, body or error) of a plain HTTP GET made by a process of this host (captured like an app's)."""
        result = self.run(sys.executable, "-c", _FETCH, url, check=False, timeout=30)
        return result.returncode == 0, result.stdout


@dataclass
class Pod(Host):
    """A meshed host: its Envoy's access log and admin API."""

    access_log: Path = field(default=Path())

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges, from the admin API on the pod's loopback."""
        ok, body = self.get("http://127.0.0.1:15000/stats")
        assert ok, body
        values: dict[str, int] = {}
        for line in body.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                values[name] = int(value)
        return values

    def log_line(self, *needles: str) -> str:
        """The first access log line containing all ``needles`` (Envoy writes a line when a connection closes)."""
        def probe() -> str | None:
            lines = self.access_log.read_text(errors="replace").splitlines()
            return next((line for line in lines if all(needle in line for needle in needles)), None)

        return _wait(f"{needles!r} in {self.access_log}", probe, seconds=30)


@dataclass
class Lab:
    """Owns the namespaces and processes of one topology, and removes them all in :meth:`close`."""

    workdir: Path
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"mg-sw-{self.suffix}"

    def netns(self, role: str) -> str:
        name = f"mg-{role}-{self.suffix}"
        _run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def build_switch(self) -> None:
        self.netns("sw")
        _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])

    def plug(self, host: Host, *addresses: str) -> None:
        """A veth from the switch's bridge to ``eth0`` of ``host``, with ``addresses`` on it."""
        port = f"v-{host.role}"
        _run(["ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.name])
        _run(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
        for address in addresses:
            extra = ["nodad"] if ":" in address else []
            _run(["ip", "-n", host.name, "addr", "add", address, "dev", "eth0", *extra])
        _run(["ip", "-n", host.name, "link", "set", "eth0", "up"])

    def start(self, host: Host, label: str, argv: list[str], uid: int | None) -> subprocess.Popen[bytes]:
        if uid is not None:
            argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]
        out = open(self.workdir / f"{host.role}-{label}.out", "wb")  # noqa: SIM115 - closed with the process
        err = open(self.workdir / f"{host.role}-{label}.err", "wb")  # noqa: SIM115
        process = subprocess.Popen(["ip", "netns", "exec", host.name, *argv], stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        err.close()
        self.processes.append((f"{host.role}/{label}", process))
        return process

    def close(self) -> None:
        for _, process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for _, process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def netns_forbidden() -> str | None:
    """Why this machine cannot run the data-plane tests, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces and iptables rules"
    for tool in ("ip", "iptables-restore", "setpriv", "tcpdump"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/run installs it)"
    probe = f"mg-probe-{secrets.token_hex(3)}"
    created = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if created.returncode != 0:
        return f"network namespaces are forbidden here: {created.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@pytest.fixture(scope="session")
def netns_allowed() -> None:
    reason = netns_forbidden()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def lab(netns_allowed: None) -> Iterator[Lab]:
    """An empty topology for tests that build their own (cleaned up like the mesh)."""
    workdir = Path(tempfile.mkdtemp(prefix="meshguard-dataplane-"))
    topology = Lab(workdir)
    try:
        yield topology
    finally:
        topology.close()
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Mesh:
    client: Pod
    server: Pod
    outside: Host
    settings: InjectionSettings
    ca_dir: Path  # the mesh CA both pods' certificates come from


def injected(settings: InjectionSettings) -> tuple[list[str], list[str], str]:
    """The args of ``meshguard-init``, the proxy's command line and the Secret's mount path, as the injector builds
    them for these settings."""
    sidecar = spec.build(settings)
    containers = {c["name"]: c for c in (*sidecar.init_containers, *sidecar.containers_front,
                                         *sidecar.containers_back)}
    proxy = containers[PROXY_NAME]
    (secret_volume,) = [v["name"] for v in sidecar.volumes if "secret" in v]
    (cert_dir,) = [m["mountPath"] for m in proxy["volumeMounts"] if m["name"] == secret_volume]
    return list(containers[INIT_NAME]["args"]), [*proxy["command"], *proxy["args"]], cert_dir


def start_pod(lab: Lab, pod: Pod, ip: str, settings: InjectionSettings, identity: tuple[str, str],
              ca_dir: Path, proxy_args: tuple[str, ...] = ()) -> None:
    """What the kubelet does with an injected pod: ``meshguard-init`` with the injector's arguments and the pod's
    Downward API values, a workload certificate from ``ca_dir`` where the proxy mounts it, then Envoy as its uid
    (with ``proxy_args`` too)."""
    netinit_args, proxy_argv, cert_dir = injected(settings)
    # The workload Secret, mounted where Envoy finds it; 0444 like the injected volume, since Envoy is not root.
    certs = write_workload_certs(ca_dir, lab.workdir / f"{pod.role}-certs", *identity)
    for path in (certs, *certs.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o444)
    state = lab.workdir / f"{pod.role}-state"  # the emptyDir shared by meshguard's containers and the proxy
    state.mkdir()
    state.chmod(0o755)
    paths = {cert_dir: str(certs), spec.STATE_DIR: str(state)}
    namespace, service_account = identity
    values = {"POD_NAME": f"{pod.role}-0", "POD_NAMESPACE": namespace, "POD_IP": ip,
              "SERVICE_ACCOUNT": service_account}
    # The init container: meshguard's own CLI with the injector's arguments, in the pod's network namespace (its
    # SDS files, and the bootstrap unless inline, go in the state).
    run_init_container(localize(netinit_args, paths), values, netns=("ip", "netns", "exec", pod.name))
    # Inline, the kubelet expands the bootstrap's $(VAR) references in the proxy's args.
    argv = localize([envoy.expand_pod_variables(arg, values) for arg in proxy_argv], paths)
    assert argv[0] == "envoy"
    pod.access_log = lab.workdir / f"{pod.role}-envoy.out"
    pod.start("envoy", envoy_binary(), *argv[1:], *proxy_args, uid=PROXY_UID)
    _wait(f"{pod.role}'s Envoy to be ready", lambda: pod.get("http://127.0.0.1:15021/healthz/ready")[0])


def _serve(host: Host, port: int, body: str, workdir: Path) -> None:
    """``python -m http.server`` answering ``/whoami`` with ``body``."""
    root = workdir / f"{host.role}-{port}-www"
    root.mkdir()
    (root / "whoami").write_text(body)
    host.start(f"app-{port}", sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0",
               "--directory", str(root))
    _wait(f"{host.role}'s app on port {port}", lambda: host.get(f"http://127.0.0.1:{port}/whoami")[0])


def build_mesh(lab: Lab, mtls_mode: str) -> Mesh:
    lab.build_switch()
    client = Pod(lab, "client", lab.netns("client"))
    server = Pod(lab, "server", lab.netns("server"))
    outside = Host(lab, "outside", lab.netns("outside"))
    lab.plug(client, f"{CLIENT_IP}/24", f"{CLIENT_IP6}/64")
    lab.plug(server, f"{SERVER_IP}/24", f"{SERVER_IP6}/64")
    lab.plug(outside, f"{OUTSIDE_IP}/24", f"{OUTSIDE_EXCLUDED_IP}/24")
    # One cluster-wide configuration, as the webhook would hold it. The PERMISSIVE mesh's proxies get their
    # bootstrap from meshguard-init, the STRICT mesh's inline: both ways carry the traffic.
    settings = InjectionSettings(
        bootstrap="init-container" if mtls_mode == "PERMISSIVE" else "inline",
        mtls_mode=mtls_mode,
        mesh_cidrs=MESH_CIDRS,
        exclude_inbound_ports=(BYPASS_PORT,),
        exclude_outbound_ports=(BYPASS_PORT,),
        exclude_outbound_ip_ranges=(f"{OUTSIDE_EXCLUDED_IP}/32",),
    )
    for host, body in ((server, "server"), (outside, "outside")):
        _serve(host, APP_PORT, body, lab.workdir)
    _serve(server, BYPASS_PORT, "server-bypass", lab.workdir)
    ca_dir = lab.workdir / "mesh-ca"
    start_pod(lab, server, SERVER_IP, settings, SERVER_ID, ca_dir)
    start_pod(lab, client, CLIENT_IP, settings, CLIENT_ID, ca_dir)
    return Mesh(client, server, outside, settings, ca_dir)


def _mesh(mtls_mode: str) -> Iterator[Mesh]:
    workdir = Path(tempfile.mkdtemp(prefix="meshguard-dataplane-"))
    workdir.chmod(0o755)  # Envoy (uid 1337) reads the certificates below it
    topology = Lab(workdir)
    try:
        yield build_mesh(topology, mtls_mode)
    finally:
        topology.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def strict_mesh(netns_allowed: None) -> Iterator[Mesh]:
    yield from _mesh("STRICT")


@pytest.fixture(scope="module")
def permissive_mesh(netns_allowed: None) -> Iterator[Mesh]:
    yield from _mesh("PERMISSIVE")


class Capture:
    """``tcpdump`` on a host's eth0 while the ``with`` block runs; :attr:`segments` afterwards."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.path = host.lab.workdir / f"{host.role}-{secrets.token_hex(3)}.pcap"
        self.segments: list[Segment] = []

    def __enter__(self) -> Capture:
        label = self.path.stem
        # Immediate mode: packets are written as they come, not in ring-buffer blocks that SIGINT may drop.
        self.process = self.host.start(label, "tcpdump", "-i", "eth0", "-n", "--immediate-mode", "-U",
                                       "-Z", "root", "-w", str(self.path), "tcp")
        errors = self.host.lab.workdir / f"{self.host.role}-{label}.err"
        _wait("tcpdump to listen", lambda: "listening on" in errors.read_text(errors="replace"), seconds=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=30)
        self.segments = read_pcap(self.path)

"""A real Kubernetes control plane on loopback, the way controller-runtime's envtest runs one.

etcd, kube-apiserver (RBAC, admission webhooks on) and kube-controller-manager (so Deployments create
ReplicaSets and Pods exactly as in production) run as child processes on free ports, with certificates made
here. There is no kubelet or scheduler: admission happens before scheduling, so Pods are created (and stay
Pending), which is all an admission webhook's tests need.

:class:`Meshguard` runs ``meshguard serve`` against it, called through the Helm chart's own webhook
configurations; the benchmark ``bench/e2e_throughput.py`` uses the same harness.
"""

from __future__ import annotations

import base64
import json
import random
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import ROOT, RunningServer, start_server
from webhook import certs

RELEASE = "meshguard"
RELEASE_NAMESPACE = "meshguard"
# Namespaces carrying this label are exempt from policy through meshguard's configuration (the only place
# exemptions live), so injection can be tested on pods the policy would refuse (opt-outs, hostNetwork).
EXEMPT_LABEL = "e2e.meshguard.io/exempt"


class BinariesMissing(RuntimeError):
    """The Go-built binaries are not in the cache: ``hack/e2e-binaries.sh`` (or ``bash .ci/run``) builds them."""


def binaries() -> Path:
    """The directory of the binaries ``hack/e2e-binaries.sh`` built and cached (the control plane, the node's
    components, kubectl and helm). It never builds them here: a cold build takes many minutes."""
    out = subprocess.run(["bash", str(ROOT / "hack" / "e2e-binaries.sh"), "--cached"], capture_output=True, text=True)
    if out.returncode != 0:
        raise BinariesMissing("the Kubernetes binaries are not built: run `bash hack/e2e-binaries.sh` once "
                              "(bash .ci/run does)")
    return Path(out.stdout.strip().splitlines()[-1])


def restartable_port(*taken: int) -> int:
    """A free loopback port below the kernel's ephemeral range, for a server that is restarted on the same address.

    A port the kernel hands out for binding to port 0 comes from the ephemeral range; while the server is down,
    one of the many connections the API server and the tests open can take it as its source port, and the
    restart then fails with "address already in use". Ports below the range are never handed out that way.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(20000, max(low, 20001))
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


@dataclass
class Component:
    """One child process with its log file; restartable with the same arguments."""

    name: str
    args: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        handle = self.log.open("ab")
        self.process = subprocess.Popen(self.args, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()

    def stop(self, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, component: Component | None = None) -> Any:
    """Poll ``check`` until it returns something truthy (and return it); connection errors count as "not yet".
    The timeout turns a hang into a failure naming what never happened; it is not a timing claim."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError, ssl.SSLError):
            pass
        if component is not None and not component.alive():
            raise RuntimeError(f"{component.name} exited while waiting for {what}:\n{component.tail()}")
        if time.monotonic() > deadline:
            tail = f":\n{component.tail()}" if component else ""
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}{tail}")
        time.sleep(0.2)


class ControlPlane:
    """etcd, kube-apiserver and kube-controller-manager on free loopback ports under ``workdir``, with an admin
    kubeconfig (client certificate in ``system:masters``) and kubectl/helm helpers that use it."""

    def __init__(self, bin_dir: Path, workdir: Path, node_ip: str | None = None,
                 apiserver_args: tuple[str, ...] = ()) -> None:
        self.bin = bin_dir
        self.dir = workdir
        self.apiserver_args = apiserver_args  # e.g. --runtime-config, to serve what an older release served
        # With a node (tests/node): the API server listens on the node's address, publishes it as the endpoint of
        # the kubernetes Service (pods reach it at 10.0.0.1) and authorizes kubelets as a real cluster does.
        self.node_ip = node_ip
        self.pki = workdir / "pki"
        self.etcd_port = restartable_port()
        self.peer_port = restartable_port(self.etcd_port)
        self.api_port = restartable_port(self.etcd_port, self.peer_port)
        self.kubeconfig = workdir / "kubeconfig"
        self.components: dict[str, Component] = {}

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    # --- certificates -------------------------------------------------------------------------------------
    def _pki(self) -> None:
        ca = certs.generate_ca("e2e-kubernetes-ca")
        certs.write_pair(self.pki, ca, "ca.crt", "ca.key")
        serving = certs.issue_leaf(
            ca, "kube-apiserver",
            dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                       "kubernetes.default.svc.cluster.local"),
            ip_addresses=("127.0.0.1", "10.0.0.1", *([self.node_ip] if self.node_ip else [])),
        )
        certs.write_pair(self.pki, serving, "apiserver.crt", "apiserver.key")
        admin = certs.issue_leaf(ca, "e2e-admin", server=False, client=True, organizations=("system:masters",))
        certs.write_pair(self.pki, admin, "admin.crt", "admin.key")
        sa = ec.generate_private_key(ec.SECP256R1())
        certs.write_atomic(self.pki / "sa.key", sa.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
        certs.write_atomic(self.pki / "sa.pub", sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
        self.write_kubeconfig(self.kubeconfig, {"client-certificate": str(self.pki / "admin.crt"),
                                                "client-key": str(self.pki / "admin.key")})

    def client_cert(self, name: str, user: str, *groups: str) -> None:
        """``pki/<name>.crt`` and ``.key``: a client certificate of this cluster's CA for ``user`` in ``groups``."""
        ca = certs.load_pair(self.pki, "ca.crt", "ca.key")
        issued = certs.issue_leaf(ca, user, server=False, client=True, organizations=groups)
        certs.write_pair(self.pki, issued, f"{name}.crt", f"{name}.key")

    def client_kubeconfig(self, name: str, user: str, *groups: str) -> Path:
        """A kubeconfig with a client certificate (:meth:`client_cert`) for ``user`` in ``groups``."""
        self.client_cert(name, user, *groups)
        return self.write_kubeconfig(self.dir / f"{name}.kubeconfig", {
            "client-certificate": str(self.pki / f"{name}.crt"), "client-key": str(self.pki / f"{name}.key")})

    def write_kubeconfig(self, path: Path, user: dict[str, str]) -> Path:
        """A kubeconfig for this API server with ``user``'s credentials (client certificate or token)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
            "clusters": [{"name": "e2e", "cluster": {"server": self.api_url,
                                                      "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "user"}}],
        }))
        return path

    def service_account_kubeconfig(self, path: Path, namespace: str, name: str) -> Path:
        """A kubeconfig holding a token of ServiceAccount ``namespace/name`` (TokenRequest), so a client runs with
        exactly the permissions RBAC grants that account."""
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration", "24h").stdout.strip()
        return self.write_kubeconfig(path, {"token": token})

    def admin_ssl(self) -> ssl.SSLContext:
        """TLS for direct API calls: trust the cluster CA, present the admin client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    # --- processes ----------------------------------------------------------------------------------------
    def _components(self) -> None:
        logs = self.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        p = self.pki
        self.components["etcd"] = Component("etcd", [
            str(self.bin / "etcd"), "--name", "e2e", "--data-dir", str(self.dir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", f"e2e=http://127.0.0.1:{self.peer_port}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ], logs / "etcd.log")
        self.components["kube-apiserver"] = Component("kube-apiserver", [
            str(self.bin / "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{self.etcd_port}",
            *self._address_args(),
            "--secure-port", str(self.api_port), "--cert-dir", str(self.dir / "apiserver-certs"),
            "--tls-cert-file", str(p / "apiserver.crt"), "--tls-private-key-file", str(p / "apiserver.key"),
            "--client-ca-file", str(p / "ca.crt"),
            "--service-account-key-file", str(p / "sa.pub"),
            "--service-account-signing-key-file", str(p / "sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range", "10.0.0.0/24",
            "--enable-admission-plugins", "NamespaceLifecycle,ServiceAccount,MutatingAdmissionWebhook,"
                                          "ValidatingAdmissionWebhook,ResourceQuota" + (
                                              ",NodeRestriction" if self.node_ip else ""),
            "--allow-privileged=true", "--profiling=false", "--v=1", *self.apiserver_args,
        ], logs / "kube-apiserver.log")
        self.components["kube-controller-manager"] = Component("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"),
            "--kubeconfig", str(self.kubeconfig), "--authentication-kubeconfig", str(self.kubeconfig),
            "--authorization-kubeconfig", str(self.kubeconfig),
            "--leader-elect=false", "--secure-port=0",
            "--service-account-private-key-file", str(p / "sa.key"), "--root-ca-file", str(p / "ca.crt"),
            # Each controller as its own ServiceAccount, as kubeadm sets it up: meshguard tells a controller's
            # request from a tenant's by that user (policy.controller_users).
            "--use-service-account-credentials=true",
            # With a node, the node lifecycle controller lifts the not-ready taint the kubelet registers with.
            "--controllers",
            "*,-nodeipam,-bootstrapsigner,-tokencleaner" + ("" if self.node_ip else ",-nodelifecycle,-ttl"),
            "--concurrent-deployment-syncs=10", "--concurrent-replicaset-syncs=10", "--v=1",
        ], logs / "kube-controller-manager.log")

    def _address_args(self) -> list[str]:
        if self.node_ip is None:
            # No kubelet runs here, and a loopback advertise address cannot be published as the endpoint of the
            # kubernetes Service: leave that Service without endpoints.
            return ["--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1", "--authorization-mode",
                    "RBAC", "--endpoint-reconciler-type=none"]
        self.client_cert("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters")
        return ["--bind-address", "0.0.0.0", "--advertise-address", self.node_ip,
                "--authorization-mode", "Node,RBAC",
                "--kubelet-client-certificate", str(self.pki / "apiserver-kubelet-client.crt"),
                "--kubelet-client-key", str(self.pki / "apiserver-kubelet-client.key"),
                "--kubelet-certificate-authority", str(self.pki / "ca.crt"),
                "--kubelet-preferred-address-types", "InternalIP"]

    def start(self) -> None:
        self._pki()
        self._components()
        etcd = self.components["etcd"]
        etcd.start()
        wait_for("etcd", lambda: httpx.get(f"http://127.0.0.1:{self.etcd_port}/health", timeout=2)
                 .json().get("health") == "true", component=etcd)
        self.start_apiserver()
        kcm = self.components["kube-controller-manager"]
        kcm.start()
        wait_for("the default ServiceAccount", lambda: self.kubectl(
            "get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
            timeout=90, component=kcm)

    def start_apiserver(self) -> None:
        api = self.components["kube-apiserver"]
        api.start()
        wait_for("kube-apiserver /readyz", self.api_ready, timeout=120, component=api)

    def api_ready(self) -> bool:
        return httpx.get(f"{self.api_url}/readyz", verify=self.admin_ssl(), timeout=3).status_code == 200

    def api_ready_quietly(self) -> bool:
        """:meth:`api_ready`, False instead of an exception when the API server is down."""
        try:
            return self.api_ready()
        except (httpx.HTTPError, OSError, ssl.SSLError):
            return False

    def restart_apiserver(self) -> None:
        self.components["kube-apiserver"].stop(timeout=5)
        self.start_apiserver()

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self.components:
                self.components[name].stop()

    # --- clients ------------------------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
                                input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def kubectl_json(self, *args: str, input: str | None = None) -> dict[str, Any]:
        return json.loads(self.kubectl(*args, "-o", "json", input=input).stdout)

    def dry_run(self, obj: dict[str, Any], namespace: str) -> dict[str, Any]:
        """The object as the API server would store it (``create --dry-run=server``): admission ran, nothing
        was stored."""
        return self.kubectl_json("create", "--dry-run=server", "-f", "-", "-n", namespace, input=json.dumps(obj))

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(self.bin / "helm"), "--kubeconfig", str(self.kubeconfig), *args],
                                capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def apply(self, manifest: str | Sequence[dict], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump_all(list(manifest))
        return self.kubectl("apply", "-f", "-", *args, input=text, check=check)

    def rules_of(self, user: str, namespace: str) -> set[tuple[str, str, str, str]]:
        """What ``user`` may do in ``namespace``, from ``kubectl auth can-i --list --as``: one (resource,
        non-resource URL, resource name, verb) per allowed combination, verbs and names split out."""
        out = self.kubectl("auth", "can-i", "--list", "--no-headers", f"--as={user}", "-n", namespace).stdout
        rules: set[tuple[str, str, str, str]] = set()
        for line in out.splitlines():
            match = re.fullmatch(r"\s*(\S*)\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s*", line)
            if not match:
                raise AssertionError(f"unexpected line from kubectl auth can-i --list: {line!r}")
            resource, urls, names, verbs = match.groups()
            for url in urls.split() or [""]:
                for name in names.split() or [""]:
                    rules.update((resource, url, name, verb) for verb in verbs.split())
        return rules


# meshguard's configuration in the suite: the chart's defaults, plus what makes the suite quick and an exemption
# the tests can opt into by namespace label.
E2E_CONFIG: dict[str, Any] = {
    "namespace": RELEASE_NAMESPACE,
    "tls": {"reload_interval_seconds": 0.5},
    "policy": {
        # A PeerAuthentication CRD installed by a test is found within a second, and watches broken by an API
        # server restart are retried within two.
        "state": {"crd_poll_seconds": 1, "backoff_max_seconds": 2},
        "exempt": {"namespace_selectors": [{"matchLabels": {EXEMPT_LABEL: "true"}}]},
    },
}


class Meshguard:
    """``meshguard serve`` on loopback serving the control plane, called through the chart's own webhook
    configurations (``webhooks.url``), and reading the cluster with a token of the chart's ServiceAccount, so the
    chart's RBAC is exactly what it has.

    The port is chosen once: a restart, like a new pod behind the Service, keeps the address the webhook
    configurations point at."""

    def __init__(self, cluster: ControlPlane, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.cert_dir = workdir / "certs"
        certs.generate_serving(self.cert_dir, RELEASE, RELEASE_NAMESPACE, dev=True)
        self.port = restartable_port()
        self.kubeconfig = workdir / "kubeconfig"
        self.server: RunningServer | None = None
        self.runs = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def service_account(self) -> str:
        return RELEASE  # the chart's full name: the release name contains the chart name

    def install(self, *values: str) -> None:
        """``helm upgrade --install`` the chart pointing at this server; ``values`` are extra helm arguments."""
        ca_bundle = base64.b64encode((self.cert_dir / "ca.crt").read_bytes()).decode()
        self.cluster.helm("upgrade", "--install", RELEASE, str(ROOT / "charts" / "meshguard"),
                          "--namespace", RELEASE_NAMESPACE, "--create-namespace", "--wait=hookOnly",
                          "--set", f"webhooks.url={self.url}", "--set", f"webhooks.caBundle={ca_bundle}", *values)
        if not self.kubeconfig.exists():
            self.cluster.service_account_kubeconfig(self.kubeconfig, RELEASE_NAMESPACE, self.service_account)

    def start(self, wait_ready: bool = True) -> RunningServer:
        """Start the server (again); each run logs into its own ``run<N>/server.log``."""
        self.runs += 1
        config = {**E2E_CONFIG, "server": {"port": self.port},
                  "tls": {**E2E_CONFIG["tls"], "cert_dir": str(self.cert_dir)}}
        # KUBERNETES_SERVICE_HOST emptied: never the in-cluster account of a machine that happens to be a pod.
        self.server = start_server(self.workdir / f"run{self.runs}", config,
                                   env={"KUBECONFIG": str(self.kubeconfig), "KUBERNETES_SERVICE_HOST": ""},
                                   dev=False, wait_ready=wait_ready)
        return self.server

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.server is not None:
            self.server.stop(sig)

    def alive(self) -> bool:
        return self.server is not None and self.server.process.poll() is None

    def readyz(self) -> httpx.Response:
        assert self.server is not None
        return httpx.get(f"{self.server.health_url}/readyz", timeout=3)

    def metric(self, sample: str) -> float:
        """The value of one Prometheus sample, e.g. ``meshguard_policy_live_rechecks_total{outcome="fresh"}``
        (0 when the series does not exist yet)."""
        assert self.server is not None
        text = httpx.get(f"{self.server.health_url}/metrics", timeout=3).text
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

"""The control plane with real parts: ``meshguard serve`` with its ADS server, and real Envoy sidecars connected to
it, in network namespaces.

Topology: a control-plane host running ``meshguard serve`` over a state directory (Pods, Services, EndpointSlices
and PeerAuthentications as manifests, which it follows as it would follow the API server); two meshed pods
(``client``, ``server``) and one unmeshed pod (``plain``) behind Services with ClusterIPs; an unmeshed ``outside``
host. Every host DNATs the ClusterIPs to the pods as kube-proxy does on a node; a meshed pod's proxy never needs
that: it sends the connection straight to an endpoint it learnt by EDS. No ``mesh_cidrs`` anywhere.

Each proxy sees the pod's files where the injected volumes put them (``/etc/meshguard/certs``,
``/var/run/meshguard``) through a mount namespace of its own, because the control plane names those paths.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dataplane.conftest import APP_PORT, PROXY_UID, Capture, Host, Lab, Pod, _serve, _wait, injected
from tests.dataplane.tools import (
    envoy_binary,
    in_pod_files,
    pod_mount_points,
    remove_mount_points,
    run_init_container,
    write_workload_certs,
)
from webhook import envoy
from webhook.certs import spiffe_id
from webhook.injection import spec
from webhook.injection.settings import InjectionSettings

pytestmark = pytest.mark.dataplane

CONTROL_IP = "10.213.0.9"
XDS_PORT = 15012
HEALTH_PORT = 8080
PODS = {  # role -> (IP, namespace, service account, meshed)
    "client": ("10.213.0.2", "shop", "frontend", True),
    "server": ("10.213.0.3", "shop", "backend", True),
    "plain": ("10.213.0.6", "shop", "default", False),  # opted out of the mesh
}
OUTSIDE_IP = "10.213.0.5"
SERVICES = {"server": ("shop", "10.214.0.10"), "plain": ("shop", "10.214.0.11")}  # role -> (namespace, ClusterIP)
SERVICE_PORT = 80
CLUSTER_IP_RANGE = "10.214.0.0/24"
INBOUND = "listener.0.0.0.0_15006"


@dataclass
class ControlledMesh:
    lab: Lab
    pods: dict[str, Host]
    outside: Host
    control: Host
    state: Path  # the directory meshguard serve follows
    control_env: dict[str, str]

    def url(self, role: str, path: str = "/whoami") -> str:
        return f"http://{SERVICES[role][1]}:{SERVICE_PORT}{path}"

    def start_control_plane(self) -> None:
        variables = (f"{k}={v}" for k, v in self.control_env.items())
        self.control.start(f"meshguard-{time.monotonic_ns()}", "env", *variables, sys.executable, "-m", "webhook",
                           "serve", "--dev", "--state", str(self.state))
        _wait("the control plane to serve", lambda: self.control.get(f"http://127.0.0.1:{HEALTH_PORT}/readyz")[0])

    def stop_control_plane(self) -> None:
        pattern = f"webhook serve --dev --state {self.state}"
        self.control.run("pkill", "-f", pattern, check=False)
        _wait("the control plane to stop", lambda: not self.control.run("pgrep", "-f", pattern, check=False).stdout)

    def write(self, name: str, objects: list[dict[str, Any]]) -> None:
        partial = self.state / f".{name}.partial"
        partial.write_text(yaml.safe_dump_all(json.loads(json.dumps(objects))))  # plain dicts for the dumper
        os.replace(partial, self.state / f"{name}.yaml")

    def remove(self, name: str) -> None:
        (self.state / f"{name}.yaml").unlink(missing_ok=True)


def _pod_manifest(role: str, settings: InjectionSettings) -> dict[str, Any]:
    ip, namespace, account, meshed = PODS[role]
    pod_spec: dict[str, Any] = {"serviceAccountName": account, "containers": [{"name": "app", "image": "app"}]}
    if meshed:  # what the injector adds, so the control plane sees exactly what it would see in a cluster
        sidecar = spec.build(settings)
        pod_spec["initContainers"] = [c for c in sidecar.init_containers]
        pod_spec["containers"] = [*sidecar.containers_front, *pod_spec["containers"], *sidecar.containers_back]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{role}-0", "namespace": namespace, "labels": {"app": role}},
            "spec": pod_spec, "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def _service_manifests(role: str) -> list[dict[str, Any]]:
    namespace, cluster_ip = SERVICES[role]
    ip = PODS[role][0]
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": role, "namespace": namespace},
         "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "selector": {"app": role},
                  "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": APP_PORT, "protocol": "TCP"}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{role}-abcde", "namespace": namespace,
                      "labels": {"kubernetes.io/service-name": role}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": APP_PORT, "protocol": "TCP"}],
         "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "name": f"{role}-0", "namespace": namespace}}]},
    ]


def _kube_proxy(host: Host) -> None:
    """The ClusterIPs DNATed to the pods, in the host's nat OUTPUT chain, after meshguard's redirect."""
    for role, (_, cluster_ip) in SERVICES.items():
        host.run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", f"{cluster_ip}/32", "--dport",
                 str(SERVICE_PORT), "-j", "DNAT", "--to-destination", f"{PODS[role][0]}:{APP_PORT}")


def _start_proxy(lab: Lab, pod: Pod, settings: InjectionSettings, ca_dir: Path) -> None:
    ip, namespace, account, _ = PODS[pod.role]
    netinit_args, proxy_argv, _ = injected(settings)
    certs = write_workload_certs(ca_dir, lab.workdir / f"{pod.role}-certs", namespace, account)
    for path in (certs, *certs.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o444)
    state = lab.workdir / f"{pod.role}-state"
    state.mkdir()
    state.chmod(0o755)
    values = {"POD_NAME": f"{pod.role}-0", "POD_NAMESPACE": namespace, "POD_IP": ip, "SERVICE_ACCOUNT": account}
    run_init_container(netinit_args, values, netns=("ip", "netns", "exec", pod.name),
                       inside=lambda argv: in_pod_files(certs, state, argv))
    argv = [envoy.expand_pod_variables(arg, values) for arg in proxy_argv]
    assert argv[0] == "envoy"
    pod.access_log = lab.workdir / f"{pod.role}-envoy.out"
    as_proxy = ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups", "--"]
    pod.start("envoy", *in_pod_files(certs, state, [*as_proxy, envoy_binary(), *argv[1:]]))


@pytest.fixture(scope="module")
def controlled(netns_allowed: None) -> Iterator[ControlledMesh]:
    made = pod_mount_points()
    workdir = Path(tempfile.mkdtemp(prefix="meshguard-xds-"))
    workdir.chmod(0o755)
    lab = Lab(workdir)
    try:
        lab.build_switch()
        hosts: dict[str, Host] = {}
        for role, (ip, *_rest, meshed) in PODS.items():
            hosts[role] = (Pod if meshed else Host)(lab, role, lab.netns(role))
            lab.plug(hosts[role], f"{ip}/24")
        outside = Host(lab, "outside", lab.netns("outside"))
        lab.plug(outside, f"{OUTSIDE_IP}/24")
        control = Host(lab, "control", lab.netns("control"))
        lab.plug(control, f"{CONTROL_IP}/24")
        settings = InjectionSettings(xds_address=f"{CONTROL_IP}:{XDS_PORT}", xds_tls=False)
        state = workdir / "state"
        state.mkdir()
        mesh = ControlledMesh(lab, hosts, outside, control, state, {
            "MESHGUARD_XDS__ENABLED": "true", "MESHGUARD_XDS__PORT": str(XDS_PORT),
            "MESHGUARD_TLS__CERT_DIR": str(workdir / "serving"), "MESHGUARD_SERVER__HEALTH_HOST": "127.0.0.1",
            "MESHGUARD_INJECTION__XDS_ADDRESS": settings.xds_address or ""})
        mesh.write("pods", [_pod_manifest(role, settings) for role in PODS])
        mesh.write("services", [m for role in SERVICES for m in _service_manifests(role)])
        mesh.start_control_plane()
        for role, host in hosts.items():
            _serve(host, APP_PORT, role, workdir)
        ca_dir = workdir / "mesh-ca"
        for host in hosts.values():
            if isinstance(host, Pod):
                _start_proxy(lab, host, settings, ca_dir)
        for host in (*hosts.values(), outside):
            host.run("ip", "route", "add", CLUSTER_IP_RANGE, "dev", "eth0")  # Service addresses: on the wire
            _kube_proxy(host)
        for host in hosts.values():
            if isinstance(host, Pod):
                _wait(f"{host.role}'s proxy to be ready", lambda h=host: h.get("http://127.0.0.1:15021/healthz/ready")[0])
        yield mesh
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)
        remove_mount_points(made)


def _peer(role: str) -> str:
    _, namespace, account, _ = PODS[role]
    return spiffe_id("cluster.local", namespace, account)


def test_meshed_to_meshed_by_cluster_ip_is_mutual_tls(controlled: ControlledMesh) -> None:
    client, server = controlled.pods["client"], controlled.pods["server"]
    assert isinstance(server, Pod)
    with Capture(server) as capture:
        assert client.get(controlled.url("server")) == (True, "server")
    line = server.log_line(f"-> {PODS['server'][0]}:{APP_PORT} ", f"peer={_peer('client')}")
    assert "tls=TLSv1.3" in line
    to_server = [s.payload for s in capture.segments if s.destination == (PODS["server"][0], APP_PORT)]
    assert to_server and to_server[0][:2] == b"\x16\x03", "the first bytes to the server are not a TLS handshake"
    assert not any(b"GET /whoami" in payload for payload in to_server)


def test_meshed_to_unmeshed_by_cluster_ip_is_plaintext(controlled: ControlledMesh) -> None:
    plain = controlled.pods["plain"]
    with Capture(plain) as capture:
        assert controlled.pods["client"].get(controlled.url("plain")) == (True, "plain")
    assert any(b"GET /whoami" in s.payload for s in capture.segments if s.destination == (PODS["plain"][0], APP_PORT))


def test_unmeshed_to_strict_server_is_refused(controlled: ControlledMesh) -> None:
    ok, error = controlled.outside.get(controlled.url("server"))
    assert not ok, "STRICT let a plaintext client through"
    ok, error = controlled.pods["plain"].get(controlled.url("server"))
    assert not ok, "STRICT let an unmeshed pod through"


def _count(pod: Pod, needle: str) -> int:
    return sum(needle in line for line in pod.access_log.read_text(errors="replace").splitlines())


def _permissive(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "migrating", "namespace": namespace}, "spec": {"mtls": {"mode": "PERMISSIVE"}}}


def test_a_peer_authentication_change_reaches_the_running_proxy(controlled: ControlledMesh) -> None:
    server = controlled.pods["server"]
    assert isinstance(server, Pod)
    # The server's Envoy process as the lab started it (a pgrep would also see other Envoys of the machine).
    (proxy,) = [process for label, process in server.lab.processes if label == "server/envoy"]
    try:
        controlled.write("peer-authentication", [_permissive("shop")])
        _wait("PERMISSIVE to reach the server's proxy", lambda: controlled.outside.get(controlled.url("server"))[0])
        assert controlled.outside.get(controlled.url("server")) == (True, "server")
        # Meshed clients still arrive with their identity.
        before = _count(server, f"peer={_peer('client')}")
        assert controlled.pods["client"].get(controlled.url("server")) == (True, "server")
        _wait("the meshed call in the server's log", lambda: _count(server, f"peer={_peer('client')}") > before)
    finally:
        controlled.remove("peer-authentication")
    _wait("STRICT to return", lambda: not controlled.outside.get(controlled.url("server"))[0])
    assert proxy.poll() is None, "the proxy was restarted"


def test_traffic_keeps_flowing_while_the_control_plane_is_down(controlled: ControlledMesh) -> None:
    client = controlled.pods["client"]
    controlled.stop_control_plane()
    try:
        for _ in range(3):
            assert client.get(controlled.url("server")) == (True, "server")
            assert client.get(controlled.url("plain")) == (True, "plain")
            time.sleep(0.5)
        # A change made while it is down reaches the proxies once it is back.
        controlled.write("peer-authentication", [_permissive("shop")])
    finally:
        controlled.start_control_plane()
    try:
        _wait("the restarted control plane to resync the proxy",
              lambda: controlled.outside.get(controlled.url("server"))[0])
        assert client.get(controlled.url("server")) == (True, "server")
    finally:
        controlled.remove("peer-authentication")
        _wait("STRICT to return", lambda: not controlled.outside.get(controlled.url("server"))[0])


def test_new_endpoints_reach_the_proxies(controlled: ControlledMesh) -> None:
    """The server's Service gains the unmeshed pod as a second endpoint: the client's proxy learns it and speaks
    plaintext to it alone, mutual TLS to the meshed one, within one Service."""
    service, endpoints = _service_manifests("server")
    endpoints["endpoints"].append({"addresses": [PODS["plain"][0]], "conditions": {"ready": True},
                                   "targetRef": {"kind": "Pod", "name": "plain-0", "namespace": "shop"}})
    client = controlled.pods["client"]
    try:
        controlled.write("services", [service, endpoints, *_service_manifests("plain")])
        answers: set[str] = set()
        _wait("both endpoints to answer", lambda: answers.add(client.get(controlled.url("server"))[1]) or
              answers >= {"plain", "server"})
        assert answers == {"plain", "server"}, answers
    finally:
        controlled.write("services", [m for role in SERVICES for m in _service_manifests(role)])


def test_proxy_config_shows_what_a_proxy_was_sent_and_acknowledged(controlled: ControlledMesh) -> None:
    def shown() -> dict[str, Any]:
        answer = controlled.control.run(sys.executable, "-m", "webhook", "proxy-config", "client-0", "-n", "shop",
                                        "--server", f"http://127.0.0.1:{HEALTH_PORT}")
        return json.loads(answer.stdout)

    # A change an earlier test made (or undid) may still be on its way: then its last response is not acked yet.
    _wait("the proxy to acknowledge its last response of every type", lambda: all(
        n["sent"] == n["acked"] for n in shown()["nonces"].values()))
    config = shown()
    assert set(config["nonces"]) == {"cds", "eds", "lds"}
    listeners = {listener["name"] for listener in config["resources"]["lds"]}
    assert listeners == {"inbound", "outbound"}
    services = {cluster["alt_stat_name"] for cluster in config["resources"]["cds"] if "alt_stat_name" in cluster}
    assert {"outbound|80||server.shop", "outbound|80||plain.shop"} <= services
    assignments = {assignment["cluster_name"] for assignment in config["resources"]["eds"]}
    assert {"outbound|80||server.shop", "outbound|80||plain.shop"} <= assignments
    missing = controlled.control.run(sys.executable, "-m", "webhook", "proxy-config", "nobody", "-n", "shop",
                                     "--server", f"http://127.0.0.1:{HEALTH_PORT}", check=False)
    assert missing.returncode == 2 and "no proxy of pod shop/nobody is connected" in missing.stderr

"""Injected workloads on a real node: pods that run, probes the kubelet sends, traffic between Services.

Each scenario is what a platform team sees after ``helm install`` and labeling a namespace. Those that need a
capability another issue adds are expected failures naming that issue; each has a control that passes without
the mesh, so the expectation is about meshguard, not about the harness.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cluster import RELEASE, RELEASE_NAMESPACE, wait_for
from tests.e2e.objects import INIT, PEER_AUTHENTICATION_CRD, PROXY, STATUS, peer_authentication
from tests.node.conftest import Cluster
from tests.node.images import APP_IMAGE, PYTHON
from tests.node.node import BRIDGE, DNS_IP, SERVICE_CIDR
from tests.pcap import read_pcap
from webhook.injection.settings import ADMIN_PORT

PORT = 8080


def app(name: str, replicas: int = 1, probes: bool = False, grace: int | None = None,
        readiness: str = "http") -> list[dict[str, Any]]:
    """A Deployment of the test app (``tests/node/app.py``) and its Service (port 80 -> 8080); with ``probes``, a
    readiness probe of kind ``readiness`` (``http`` on /healthz, or ``grpc`` health on 8081) and a tcpSocket
    liveness probe."""
    container: dict[str, Any] = {"name": "app", "image": APP_IMAGE, "imagePullPolicy": "Never",
                                 "ports": [{"name": "http", "containerPort": PORT}]}
    if probes:
        # Quick probes, so "not Ready" and "restarted" show within seconds.
        check = {"httpGet": {"path": "/healthz", "port": "http"}} if readiness == "http" else {"grpc": {"port": 8081}}
        container["readinessProbe"] = {**check, "periodSeconds": 1, "failureThreshold": 1}
        container["livenessProbe"] = {"tcpSocket": {"port": PORT}, "periodSeconds": 1, "failureThreshold": 2}
    spec: dict[str, Any] = {"containers": [container]}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    labels = {"app": name}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
         "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": spec}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
    ]


def run(cluster: Cluster, namespace: str, name: str, **options: Any) -> dict[str, Any]:
    """Deploy the app as ``name`` and return its first pod once Ready and its Service routed."""
    cluster.apply(app(name, **options), namespace)
    pod = cluster.wait_ready(namespace, f"app={name}")[0]
    cluster.wait_routed(namespace, name)
    return pod


def cluster_ip(cluster: Cluster, namespace: str, service: str) -> str:
    return cluster.json("get", "service", service, "-n", namespace)["spec"]["clusterIP"]


def spiffe(namespace: str) -> str:
    return f"spiffe://cluster.local/ns/{namespace}/sa/default"


# The addresses the outbound listener sends to the services chain, from the proxy's admin API (in the pod).
_SERVICES_RULE = """
import json, sys, urllib.request
dump = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/config_dump?resource=dynamic_listeners"))
(outbound,) = [c["active_state"]["listener"] for c in dump["configs"] if c["name"] == "outbound"]
for matcher in outbound["filter_chain_matcher"]["matcher_list"]["matchers"]:
    if matcher["on_match"].get("action", {}).get("typed_config", {}).get("value") == "outbound-services":
        ranges = matcher["predicate"]["single_predicate"]["custom_match"]["typed_config"]["cidr_ranges"]
        print(" ".join(f"{r['address_prefix']}/{r['prefix_len']}" for r in ranges))
"""


def services_rule(cluster: Cluster, namespace: str, pod: str) -> list[str]:
    answered = cluster.exec(namespace, pod, str(PYTHON), "-c", _SERVICES_RULE, str(ADMIN_PORT))
    return answered.stdout.split()


class Tcpdump:
    """``tcpdump`` of the TCP traffic between two pods on the node's pod bridge while the ``with`` block runs;
    :attr:`payloads` afterwards. Only between them: the kubelet's probes of either pod are plaintext by design."""

    def __init__(self, path: Path, host: str, peer: str) -> None:
        self.path = path
        self.host = host
        self.peer = peer
        self.payloads: list[bytes] = []

    def __enter__(self) -> Tcpdump:
        self.errors = self.path.with_suffix(".err")
        with self.errors.open("wb") as err:
            self.process = subprocess.Popen(
                ["tcpdump", "-i", BRIDGE, "-n", "--immediate-mode", "-U", "-Z", "root", "-w", str(self.path),
                 "tcp and host", self.host, "and host", self.peer], stdout=subprocess.DEVNULL, stderr=err)
        wait_for("tcpdump to listen", lambda: "listening on" in self.errors.read_text(errors="replace"))
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=30)
        self.payloads = [segment.payload for segment in read_pcap(self.path)]


def test_meshed_deployment_runs_ready_with_its_sidecar(cluster: Cluster) -> None:
    namespace = cluster.mesh_namespace("web")
    pod = run(cluster, namespace, "web")
    init = {c["name"]: c for c in pod["spec"]["initContainers"]}
    assert list(init)[:1] == [INIT] and PROXY in init and init[PROXY]["restartPolicy"] == "Always"
    assert STATUS in pod["metadata"]["annotations"]
    statuses = {s["name"]: s for s in pod["status"]["initContainerStatuses"] + pod["status"]["containerStatuses"]}
    assert statuses[INIT]["state"]["terminated"]["exitCode"] == 0
    assert statuses[PROXY]["ready"] and statuses["app"]["ready"], statuses


def test_service_to_service_is_mutual_tls_by_cluster_ip_and_pod_ip(cluster: Cluster, tmp_path: Path) -> None:
    server_ns = cluster.mesh_namespace("server")
    client_ns = cluster.mesh_namespace("client")
    server = run(cluster, server_ns, "web")
    client = run(cluster, client_ns, "client")
    with Tcpdump(tmp_path / "bridge.pcap", client["status"]["podIP"], server["status"]["podIP"]) as capture:
        name = client["metadata"]["name"]
        by_service = cluster.get(client_ns, name, f"http://{cluster_ip(cluster, server_ns, 'web')}/")
        by_pod = cluster.get(client_ns, name, f"http://{server['status']['podIP']}:{PORT}/")
    assert by_service.returncode == 0, by_service.stdout + by_service.stderr
    assert by_pod.returncode == 0, by_pod.stdout + by_pod.stderr
    # The client's proxy routes every ClusterIP by the cluster's ServiceCIDR, which the control plane read from the
    # API server: one rule for every Service, present and future.
    assert services_rule(cluster, client_ns, name) == [SERVICE_CIDR]
    # The server's proxy verified the client's certificate: its access log (one line per connection, written as
    # Envoy flushes it) names the client's workload for both calls.
    wait_for("both calls in the server proxy's access log", lambda: cluster.logs(
        server_ns, server["metadata"]["name"], PROXY).count(f"peer={spiffe(client_ns)}") >= 2, timeout=30)
    # On the wire between the pods: TLS records, never the request itself.
    assert capture.payloads, "tcpdump saw no TCP payload on the bridge"
    assert not [p for p in capture.payloads if b"GET /" in p], "plaintext HTTP crossed the bridge"
    assert any(p.startswith(b"\x16\x03") for p in capture.payloads), "no TLS handshake crossed the bridge"


# One DNS query over TCP (what a resolver falls back to for large answers): the A records of a name, as text.
_DNS_TCP = """
import socket, struct, sys
name, server = sys.argv[1], sys.argv[2]
query = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"".join(
    bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0" + struct.pack(">HH", 1, 1)
with socket.create_connection((server, 53), timeout=10) as s:
    s.sendall(struct.pack(">H", len(query)) + query)
    size = struct.unpack(">H", s.recv(2))[0]
    answer = b""
    while len(answer) < size:
        answer += s.recv(size - len(answer))
count = struct.unpack(">H", answer[6:8])[0]
print(" ".join(socket.inet_ntoa(answer[-4 - 16 * i:][:4]) for i in range(count)))
"""


def test_services_are_called_by_name_over_mutual_tls_and_dns_works_through_the_proxy(cluster: Cluster) -> None:
    server_ns = cluster.mesh_namespace("server")
    client_ns = cluster.mesh_namespace("client")
    server = run(cluster, server_ns, "web")
    client = run(cluster, client_ns, "client")
    name = client["metadata"]["name"]
    # The name resolves through the cluster DNS (over UDP, which the redirect leaves alone)...
    by_name = cluster.get(client_ns, name, f"http://web.{server_ns}.svc.cluster.local/")
    assert by_name.returncode == 0, by_name.stdout + by_name.stderr
    short = cluster.get(client_ns, name, f"http://web.{server_ns}/")  # the pod's search domains
    assert short.returncode == 0, short.stdout + short.stderr
    # ...and the call is mutual TLS: the server's proxy verified the client's identity.
    wait_for("the calls by name in the server proxy's access log", lambda: cluster.logs(
        server_ns, server["metadata"]["name"], PROXY).count(f"peer={spiffe(client_ns)}") >= 2, timeout=30)
    # DNS over TCP from the meshed pod is captured by the redirect and reaches the (unmeshed) DNS in plaintext.
    answered = cluster.exec(client_ns, name, str(PYTHON), "-c", _DNS_TCP, f"web.{server_ns}.svc.cluster.local",
                            DNS_IP)
    assert answered.stdout.split() == [cluster_ip(cluster, server_ns, "web")], answered.stdout + answered.stderr
    wait_for("the DNS connection in the client proxy's access log", lambda: f"-> {DNS_IP}:53 " in cluster.logs(
        client_ns, name, PROXY), timeout=30)  # it went through the proxy, to the address dialled


def test_a_pod_outside_the_mesh_is_refused_by_a_strict_server(cluster: Cluster) -> None:
    server_ns = cluster.mesh_namespace("server")
    outside_ns = cluster.plain_namespace("outside")
    run(cluster, server_ns, "web")
    outsider = run(cluster, outside_ns, "outsider")
    assert PROXY not in [c["name"] for c in outsider["spec"].get("initContainers") or []]
    answer = cluster.get(outside_ns, outsider["metadata"]["name"], f"http://{cluster_ip(cluster, server_ns, 'web')}/")
    # Accepted, then closed by the STRICT listener (a refusal would mean no route, not mTLS).
    assert answer.returncode == 2 and "refused" not in answer.stdout, answer.stdout + answer.stderr
    # The control: the same client reaches an unmeshed server, so the refusal is the STRICT listener's.
    run(cluster, outside_ns, "plain-web")
    control = cluster.get(outside_ns, outsider["metadata"]["name"],
                          f"http://{cluster_ip(cluster, outside_ns, 'plain-web')}/")
    assert control.returncode == 0, control.stdout + control.stderr


def test_a_meshed_pod_reaches_unmeshed_services_in_plaintext(cluster: Cluster, tmp_path: Path) -> None:
    """The control plane knows the far side has no proxy: an unmeshed app and the API server's ``kubernetes``
    Service are called as they are, with no CIDR configured anywhere."""
    client_ns = cluster.mesh_namespace("client")
    outside_ns = cluster.plain_namespace("outside")
    outside = run(cluster, outside_ns, "plain-web")
    client_pod = run(cluster, client_ns, "client")
    client = client_pod["metadata"]["name"]
    with Tcpdump(tmp_path / "bridge.pcap", outside["status"]["podIP"], client_pod["status"]["podIP"]) as capture:
        answer = cluster.get(client_ns, client, f"http://{cluster_ip(cluster, outside_ns, 'plain-web')}/")
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert any(b"GET /" in p for p in capture.payloads), "the call to the unmeshed pod was not plaintext"
    api = cluster.get(client_ns, client, f"https://{cluster_ip(cluster, 'default', 'kubernetes')}/version")
    assert api.returncode == 0 and '"gitVersion"' in api.stdout, api.stdout + api.stderr


def test_a_service_whose_pods_all_terminate_still_answers_while_they_drain(cluster: Cluster) -> None:
    """With no ready endpoint left, kube-proxy sends a Service's traffic to the endpoints terminating but still
    serving; the client's proxy, which dials endpoints itself, does the same (over mutual TLS)."""
    server_ns = cluster.mesh_namespace("server")
    client_ns = cluster.mesh_namespace("client")
    objects = app("web", grace=60)
    objects[0]["spec"]["template"]["spec"]["containers"][0]["lifecycle"] = {"preStop": {"sleep": {"seconds": 45}}}
    cluster.apply(objects, server_ns)
    server = cluster.wait_ready(server_ns, "app=web")[0]["metadata"]["name"]
    cluster.wait_routed(server_ns, "web")
    client = run(cluster, client_ns, "client")["metadata"]["name"]
    url = f"http://{cluster_ip(cluster, server_ns, 'web')}/"
    cluster.kubectl("scale", "deployment", "web", "-n", server_ns, "--replicas=0")

    def draining() -> bool:
        slices = cluster.json("get", "endpointslices", "-n", server_ns, "-l", "kubernetes.io/service-name=web")
        conditions = [e.get("conditions", {}) for s in slices["items"] for e in s.get("endpoints") or []]
        return bool(conditions) and all(c.get("terminating") and c.get("serving") and not c.get("ready")
                                        for c in conditions)

    try:
        wait_for("the Service's only endpoint to be terminating and serving", draining, timeout=30)
        for _ in range(5):  # a few seconds of calls: the change of conditions reaches the client's proxy meanwhile
            answer = cluster.get(client_ns, client, url)
            assert answer.returncode == 0, answer.stdout + answer.stderr
            time.sleep(1)
        wait_for("the call in the draining server's proxy log", lambda: f"peer={spiffe(client_ns)}" in cluster.logs(
            server_ns, server, PROXY), timeout=30)
    finally:
        cluster.kubectl("delete", "pod", server, "-n", server_ns, "--grace-period=0", "--force", check=False)


def test_services_whose_endpoint_depends_on_the_caller_are_left_to_kube_proxy(cluster: Cluster) -> None:
    """``sessionAffinity: ClientIP`` keeps a client on one pod and ``internalTrafficPolicy: Local`` is served by
    the node's own pods, over mutual TLS: the client's proxy dials their ClusterIP and kube-proxy picks. The
    control: the same pods behind a plain Service are spread over by the client's proxy."""
    server_ns = cluster.mesh_namespace("server")
    client_ns = cluster.mesh_namespace("client")
    deployment, plain = app("web", replicas=3)
    services = [plain] + [{**plain, "metadata": {"name": name}, "spec": {**plain["spec"], **extra}}
                          for name, extra in (("sticky", {"sessionAffinity": "ClientIP"}),
                                              ("local", {"internalTrafficPolicy": "Local"}))]
    cluster.apply([deployment, *services], server_ns)
    cluster.kubectl("rollout", "status", "deployment/web", "-n", server_ns, "--timeout=120s", timeout=130)
    for service in services:
        cluster.wait_routed(server_ns, service["metadata"]["name"])
    client = run(cluster, client_ns, "client")["metadata"]["name"]

    def answered_by(service: str) -> list[str]:
        pods = []
        for _ in range(6):  # each call a new connection, so the client's proxy balances each
            answer = cluster.get(client_ns, client, f"http://{service}.{server_ns}/")
            assert answer.returncode == 0, answer.stdout + answer.stderr
            pods.append(json.loads(answer.stdout.split(" ", 1)[1])["pod"])
        return pods

    assert len(set(answered_by("web"))) > 1
    sticky = answered_by("sticky")
    assert len(set(sticky)) == 1, sticky
    local = answered_by("local")  # one node: every pod is the node's own
    for pod in {sticky[0], local[0]}:
        wait_for(f"the calls in {pod}'s proxy log", lambda pod=pod: f"peer={spiffe(client_ns)}" in cluster.logs(
            server_ns, pod, PROXY), timeout=30)


def test_a_peer_authentication_change_reaches_running_proxies(cluster: Cluster) -> None:
    """PERMISSIVE on the server's namespace lets the plaintext outsider in, and removing it shuts it out again,
    with no pod restarted: the control plane pushes each proxy its new inbound modes."""
    server_ns = cluster.mesh_namespace("server")
    outside_ns = cluster.plain_namespace("outside")
    server = run(cluster, server_ns, "web")
    outsider = run(cluster, outside_ns, "outsider")["metadata"]["name"]
    url = f"http://{cluster_ip(cluster, server_ns, 'web')}/"
    assert cluster.get(outside_ns, outsider, url).returncode == 2
    cluster.apply([PEER_AUTHENTICATION_CRD], "default")
    cluster.kubectl("wait", "--for=condition=Established", "crd/peerauthentications.security.istio.io")
    try:
        cluster.apply([peer_authentication("migrating", "PERMISSIVE")], server_ns)
        wait_for("PERMISSIVE to reach the server's proxy",
                 lambda: cluster.get(outside_ns, outsider, url).returncode == 0, timeout=90)
        cluster.kubectl("delete", "peerauthentication", "migrating", "-n", server_ns)
        wait_for("STRICT to return", lambda: cluster.get(outside_ns, outsider, url).returncode == 2, timeout=90)
    finally:
        cluster.kubectl("delete", "crd", "peerauthentications.security.istio.io", "--wait=true", check=False)
    now = cluster.json("get", "pod", server["metadata"]["name"], "-n", server_ns)["status"]
    assert all(s["restartCount"] == 0 for s in now["initContainerStatuses"] + now["containerStatuses"]), now


@pytest.mark.parametrize("readiness", ["http", "grpc"])
@pytest.mark.parametrize("meshed", [pytest.param(False, id="without-mesh"), pytest.param(True, id="meshed")])
def test_app_probes_mean_what_they_meant(cluster: Cluster, meshed: bool, readiness: str) -> None:
    """Under STRICT, the kubelet's plaintext probes reach the app only through the sidecar's rewritten probes; the
    same app without the mesh is the control. The readiness probe is httpGet or gRPC health."""
    namespace = cluster.mesh_namespace("probes") if meshed else cluster.plain_namespace("probes")
    cluster.apply(app("web", probes=True, readiness=readiness), namespace)
    pod = cluster.wait_ready(namespace, "app=web", timeout=60)[0]
    name = pod["metadata"]["name"]
    if meshed:
        (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "app"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/app-health/app/readyz"
    # A broken app (its health check fails) is taken out of the Service...
    cluster.exec(namespace, name, str(PYTHON), "-c", "open('/tmp/unhealthy', 'w')")
    wait_for("the broken app to be not Ready", lambda: not _ready(cluster, namespace, name), timeout=30)
    cluster.exec(namespace, name, str(PYTHON), "-c", "import os; os.remove('/tmp/unhealthy')")
    wait_for("the mended app to be Ready", lambda: _ready(cluster, namespace, name), timeout=30)
    # ... and a dead one (process alive, port closed) is restarted by its tcpSocket liveness probe.
    cluster.exec(namespace, name, str(PYTHON), "-c", "open('/tmp/dead', 'w')")
    wait_for("the dead app to be restarted", lambda: _restarts(cluster, namespace, name) >= 1, timeout=60)


def _app_status(cluster: Cluster, namespace: str, pod: str) -> dict[str, Any]:
    statuses = cluster.json("get", "pod", pod, "-n", namespace)["status"].get("containerStatuses") or []
    return next((s for s in statuses if s["name"] == "app"), {})


def _ready(cluster: Cluster, namespace: str, pod: str) -> bool:
    return bool(_app_status(cluster, namespace, pod).get("ready"))


def _restarts(cluster: Cluster, namespace: str, pod: str) -> int:
    return int(_app_status(cluster, namespace, pod).get("restartCount", 0))


def test_a_job_with_the_sidecar_completes(cluster: Cluster) -> None:
    namespace = cluster.mesh_namespace("job")
    cluster.apply([{"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
                    "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
                        {"name": "app", "image": APP_IMAGE, "imagePullPolicy": "Never",
                         "command": [str(PYTHON), "-c", "print('done')"]}]}}}}], namespace)
    cluster.kubectl("wait", "--for=condition=Complete", "job/once", "-n", namespace, "--timeout=120s", timeout=130)
    pod = cluster.json("get", "pods", "-l", "job-name=once", "-n", namespace)["items"][0]
    assert PROXY in [c["name"] for c in pod["spec"]["initContainers"]]


def test_a_pod_with_no_grace_period_is_created_and_deleted(cluster: Cluster) -> None:
    namespace = cluster.mesh_namespace("nograce")
    pod = run(cluster, namespace, "web", grace=0)
    cluster.kubectl("delete", "pod", pod["metadata"]["name"], "-n", namespace, "--timeout=60s")


def test_meshed_pods_ride_out_a_meshguard_outage(cluster: Cluster) -> None:
    server_ns = cluster.mesh_namespace("server")
    client_ns = cluster.mesh_namespace("client")
    run(cluster, server_ns, "web")
    client = run(cluster, client_ns, "client")["metadata"]["name"]
    url = f"http://{cluster_ip(cluster, server_ns, 'web')}/"
    deployment = ["deployment", RELEASE, "-n", RELEASE_NAMESPACE]
    cluster.kubectl("scale", *deployment, "--replicas=0")
    try:
        cluster.kubectl("wait", "--for=delete", "pod", "-l", "app.kubernetes.io/component=webhook",
                        "-n", RELEASE_NAMESPACE, "--timeout=90s", timeout=100)
        # Running meshed pods do not need meshguard.
        answer = cluster.get(client_ns, client, url)
        assert answer.returncode == 0, answer.stdout + answer.stderr
        # New pods of a mesh namespace wait (the injection webhook fails closed) ...
        cluster.apply(app("late"), server_ns)
        wait_for("the ReplicaSet to be refused", lambda: "FailedCreate" in cluster.kubectl(
            "get", "events", "-n", server_ns, "--field-selector", "reason=FailedCreate").stdout, timeout=60)
        assert not cluster.json("get", "pods", "-l", "app=late", "-n", server_ns)["items"]
    finally:
        cluster.kubectl("scale", *deployment, "--replicas=2")
    # ... and start, injected, once it is back.
    cluster.kubectl("rollout", "status", *deployment, "--timeout=180s", timeout=190)
    late = cluster.wait_ready(server_ns, "app=late", timeout=180)[0]
    assert PROXY in [c["name"] for c in late["spec"]["initContainers"]]


def test_the_audit_cronjob_reports_the_cluster_with_its_own_account(cluster: Cluster) -> None:
    """The chart's CronJob, run now: its ServiceAccount may list what it reads, and the report is its log."""
    namespace = cluster.mesh_namespace("audited")
    run(cluster, namespace, "web")
    job = "audit-now"
    cluster.kubectl("create", "job", job, f"--from=cronjob/{RELEASE}-audit", "-n", RELEASE_NAMESPACE)
    try:
        wait_for("the audit to finish", lambda: any(
            c["type"] in ("Complete", "Failed") and c["status"] == "True"
            for c in cluster.json("get", "job", job, "-n", RELEASE_NAMESPACE).get("status", {}).get("conditions", [])),
            timeout=180)
        log = cluster.kubectl("logs", f"job/{job}", "-n", RELEASE_NAMESPACE).stdout
        report = json.loads(log[log.index("{"):])  # after the progress lines (stderr, in the same log)
    finally:
        cluster.kubectl("delete", "job", job, "-n", RELEASE_NAMESPACE, "--wait=false", check=False)
    audited = {(w["kind"], w["namespace"], w["name"]): w for w in report["workloads"]}
    assert audited[("Deployment", namespace, "web")]["passed"] is True
    assert report["summary"]["workloads"] >= len(audited) > 0

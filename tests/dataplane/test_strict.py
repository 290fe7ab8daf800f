"""The proof under STRICT mTLS: real Envoy sidecars and real iptables rules, in network namespaces.

The client app and the server app speak plain HTTP to each other's pod IP and app port, as apps do in a mesh;
everything else is what the injector puts next to them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.dataplane.conftest import (
    APP_PORT,
    BYPASS_PORT,
    CLIENT_ID,
    CLIENT_IP,
    OUTSIDE_EXCLUDED_IP,
    OUTSIDE_IP,
    SERVER_IP,
    SERVER_IP6,
    Capture,
    Mesh,
)
from webhook import certs
from webhook.certs import spiffe_id

pytestmark = pytest.mark.dataplane

INBOUND = "listener.0.0.0.0_15006"
OUTBOUND = "listener.0.0.0.0_15001"
CLIENT_SPIFFE = spiffe_id("cluster.local", *CLIENT_ID)


def test_client_reaches_server_with_mutual_tls_and_its_identity(strict_mesh: Mesh) -> None:
    before = strict_mesh.server.stats()
    assert strict_mesh.client.get(f"http://{SERVER_IP}:{APP_PORT}/whoami") == (True, "server")
    # The server's Envoy verified the client's certificate: its SPIFFE ID is the connection's peer.
    line = strict_mesh.server.log_line(f"{CLIENT_IP}:", f"-> {SERVER_IP}:{APP_PORT} ")
    assert f"peer={CLIENT_SPIFFE}" in line and f"upstream=127.0.0.1:{APP_PORT}" in line
    assert "tls=TLSv1.3" in line
    after = strict_mesh.server.stats()
    assert after[f"{INBOUND}.ssl.handshake"] > before.get(f"{INBOUND}.ssl.handshake", 0)
    assert after[f"{INBOUND}.ssl.no_certificate"] == 0
    # The client side: the connection left through the mesh cluster, which did the TLS handshake.
    assert strict_mesh.client.stats()["cluster.outbound|mesh-mtls.ssl.handshake"] >= 1


def test_bytes_between_the_pods_are_tls_not_http(strict_mesh: Mesh) -> None:
    with Capture(strict_mesh.server) as capture:
        assert strict_mesh.client.get(f"http://{SERVER_IP}:{APP_PORT}/whoami?capture") == (True, "server")
    to_server = [s.payload for s in capture.segments if s.destination == (SERVER_IP, APP_PORT)]
    from_server = [s.payload for s in capture.segments if s.source == (SERVER_IP, APP_PORT)]
    assert to_server and from_server, "the capture saw no traffic of the request"
    assert to_server[0][:2] == b"\x16\x03", "the first bytes to the server are not a TLS handshake record"
    on_wire = b"".join(to_server + from_server)
    assert b"GET /whoami" not in on_wire and b"HTTP/1." not in on_wire and b"server" not in on_wire
    # The capture does see plaintext when there is some: the excluded port carries plain HTTP.
    with Capture(strict_mesh.server) as control:
        assert strict_mesh.client.get(f"http://{SERVER_IP}:{BYPASS_PORT}/whoami") == (True, "server-bypass")
    assert any(b"GET /whoami" in s.payload for s in control.segments if s.destination == (SERVER_IP, BYPASS_PORT))


def test_ipv6_traffic_gets_the_same_mutual_tls(strict_mesh: Mesh) -> None:
    assert strict_mesh.client.get(f"http://[{SERVER_IP6}]:{APP_PORT}/whoami") == (True, "server")
    assert f"peer={CLIENT_SPIFFE}" in strict_mesh.server.log_line(f"-> [{SERVER_IP6}]:{APP_PORT}")


def test_outside_host_in_plaintext_is_refused(strict_mesh: Mesh) -> None:
    before = strict_mesh.server.stats().get(f"{INBOUND}.no_filter_chain_match", 0)
    ok, error = strict_mesh.outside.get(f"http://{SERVER_IP}:{APP_PORT}/whoami")
    assert not ok, "STRICT let a plaintext client through"
    assert "Connection" in error or "Remote" in error, error
    assert strict_mesh.server.stats()[f"{INBOUND}.no_filter_chain_match"] > before


def test_excluded_inbound_port_bypasses_the_proxy(strict_mesh: Mesh) -> None:
    before = strict_mesh.server.stats().get(f"{INBOUND}.downstream_cx_total", 0)
    assert strict_mesh.outside.get(f"http://{SERVER_IP}:{BYPASS_PORT}/whoami") == (True, "server-bypass")
    assert strict_mesh.server.stats()[f"{INBOUND}.downstream_cx_total"] == before


def test_excluded_outbound_port_bypasses_the_proxy(strict_mesh: Mesh) -> None:
    before = strict_mesh.client.stats()[f"{OUTBOUND}.downstream_cx_total"]
    # Port 9090 is excluded on the way out (and in): plain HTTP straight to the server's app.
    assert strict_mesh.client.get(f"http://{SERVER_IP}:{BYPASS_PORT}/whoami") == (True, "server-bypass")
    assert strict_mesh.client.stats()[f"{OUTBOUND}.downstream_cx_total"] == before


def test_excluded_range_bypasses_the_proxy_and_other_destinations_pass_through_it(strict_mesh: Mesh) -> None:
    client = strict_mesh.client
    before = client.stats()
    assert client.get(f"http://{OUTSIDE_EXCLUDED_IP}:{APP_PORT}/whoami") == (True, "outside")
    middle = client.stats()
    assert middle[f"{OUTBOUND}.downstream_cx_total"] == before[f"{OUTBOUND}.downstream_cx_total"]
    # The same host on an address that is neither excluded nor in the mesh: through Envoy, untouched.
    assert client.get(f"http://{OUTSIDE_IP}:{APP_PORT}/whoami") == (True, "outside")
    after = client.stats()
    assert after["tcp.outbound_passthrough.downstream_cx_total"] == (
        middle.get("tcp.outbound_passthrough.downstream_cx_total", 0) + 1)
    assert "cluster=outbound|passthrough peer=-" in client.log_line(f"upstream={OUTSIDE_IP}:{APP_PORT}")


def test_proxy_ports_are_not_reachable_through_the_inbound_listener(strict_mesh: Mesh) -> None:
    """A mesh peer asking for the server's port 15000 must not get Envoy's admin API (blackholed instead)."""
    ok, _ = strict_mesh.client.get(f"http://{SERVER_IP}:15000/stats")
    assert not ok
    assert strict_mesh.server.stats()["tcp.inbound_blackhole.downstream_cx_total"] >= 1


def test_stats_and_readiness_are_served_on_the_pod_ip(strict_mesh: Mesh) -> None:
    ok, body = strict_mesh.outside.get(f"http://{SERVER_IP}:15090/stats/prometheus")
    assert ok and "envoy_listener_downstream_cx_total" in body
    assert strict_mesh.outside.get(f"http://{SERVER_IP}:15021/healthz/ready") == (True, "LIVE\n")
    # Only those paths: the admin API itself stays on the pod's loopback.
    ok, _ = strict_mesh.outside.get(f"http://{SERVER_IP}:15021/quitquitquit")
    assert not ok


# A TLS client with a certificate of our choosing (run inside a namespace): prints the response or the error.
_TLS_GET = """
import socket, ssl, sys
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
context.load_cert_chain(sys.argv[3], sys.argv[4])
response = b""
try:
    with context.wrap_socket(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)) as tls:
        tls.sendall(b"GET /whoami HTTP/1.0\\r\\n\\r\\n")
        while chunk := tls.recv(4096):
            response += chunk
except (OSError, ssl.SSLError) as exc:
    if not response:  # refused; an abrupt end after the response is still a response
        print(f"{type(exc).__name__}: {exc}", end="")
        sys.exit(1)
print(response.decode(errors="replace"), end="")
"""


@pytest.mark.parametrize(
    ("issuer", "trust_domain", "accepted"),
    [("mesh", "cluster.local", True), ("foreign", "cluster.local", False), ("mesh", "other.example", False)],
    ids=["mesh-certificate", "another-ca", "another-trust-domain"],
)
def test_inbound_accepts_only_mesh_certificates_of_its_trust_domain(
    strict_mesh: Mesh, tmp_path: Path, issuer: str, trust_domain: str, accepted: bool
) -> None:
    mesh_ca = certs.load_pair(strict_mesh.ca_dir, certs.CA_CERT, certs.CA_KEY)
    ca = mesh_ca if issuer == "mesh" else certs.generate_ca("someone-else")
    leaf = certs.issue_workload(ca, "shop", "intruder", trust_domain=trust_domain)
    certs.write_pair(tmp_path, leaf, certs.TLS_CERT, certs.TLS_KEY)
    before = strict_mesh.server.stats()
    result = strict_mesh.outside.run(sys.executable, "-c", _TLS_GET, SERVER_IP, str(APP_PORT),
                                     str(tmp_path / certs.TLS_CERT), str(tmp_path / certs.TLS_KEY), check=False)
    if accepted:
        assert result.returncode == 0 and result.stdout.endswith("server"), result.stdout
        return
    assert result.returncode == 1 and "SSL" in result.stdout, result.stdout
    after = strict_mesh.server.stats()
    counter = f"{INBOUND}.ssl.fail_verify_error" if issuer == "foreign" else f"{INBOUND}.ssl.fail_verify_san"
    assert after[counter] == before.get(counter, 0) + 1

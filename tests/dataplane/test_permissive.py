"""PERMISSIVE: the server also accepts plaintext (workloads migrating into the mesh), yet meshed peers still
arrive over mutual TLS with their identity."""

from __future__ import annotations

import pytest

from tests.dataplane.conftest import APP_PORT, CLIENT_ID, OUTSIDE_IP, SERVER_IP, Capture, Mesh
from webhook.certs import spiffe_id

pytestmark = pytest.mark.dataplane


def test_outside_host_in_plaintext_is_allowed(permissive_mesh: Mesh) -> None:
    with Capture(permissive_mesh.server) as capture:
        assert permissive_mesh.outside.get(f"http://{SERVER_IP}:{APP_PORT}/whoami") == (True, "server")
    assert any(b"GET /whoami" in s.payload for s in capture.segments if s.destination == (SERVER_IP, APP_PORT))
    # Through the server's Envoy, over the plaintext chain: no peer identity.
    line = permissive_mesh.server.log_line(f"{OUTSIDE_IP}:", f"-> {SERVER_IP}:{APP_PORT} ")
    assert "peer=- tls=-" in line and f"upstream=127.0.0.1:{APP_PORT}" in line


def test_meshed_client_still_uses_mutual_tls(permissive_mesh: Mesh) -> None:
    with Capture(permissive_mesh.server) as capture:
        assert permissive_mesh.client.get(f"http://{SERVER_IP}:{APP_PORT}/whoami?meshed") == (True, "server")
    to_server = [s.payload for s in capture.segments if s.destination == (SERVER_IP, APP_PORT)]
    assert to_server and to_server[0][:2] == b"\x16\x03"
    assert not any(b"GET /whoami" in payload for payload in to_server)
    assert f"peer={spiffe_id('cluster.local', *CLIENT_ID)}" in permissive_mesh.server.log_line("peer=spiffe://")

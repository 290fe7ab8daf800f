"""The real Envoy picks up a rotated workload certificate without a restart, and keeps open connections.

The certificate directory is laid out as the kubelet writes Secret and projected volumes (files behind a
``..data`` link that is swapped atomically); the proxy reads it through the SDS files meshguard-init writes.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from tests.conftest import free_port
from tests.dataplane.tools import envoy_binary
from webhook import certs, envoy


def _volume(root: Path, ca: certs.Issued, version: str) -> certs.Issued:
    """Write a workload pair and the CA as the kubelet's atomic writer does: a new dir, then swap ``..data``."""
    issued = certs.issue_workload(ca, "shop", "web")
    payload = root / f"..{version}"
    payload.mkdir()
    for name, data in ((certs.TLS_CERT, issued.cert_pem()), (certs.TLS_KEY, issued.key_pem()),
                       (certs.CA_CERT, ca.cert_pem())):
        (payload / name).write_bytes(data)
    (root / "..data_tmp").symlink_to(payload.name)
    os.replace(root / "..data_tmp", root / "..data")
    for name in (certs.TLS_CERT, certs.TLS_KEY, certs.CA_CERT):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")
    return issued


def _handshake(port: int, client: certs.Issued, ca_file: Path, tmp: Path) -> tuple[int, ssl.SSLSocket]:
    """A mutual-TLS connection to the inbound listener; returns the served certificate's serial and the socket."""
    (tmp / "client.crt").write_bytes(client.cert_pem())
    (tmp / "client.key").write_bytes(client.key_pem())
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = False  # workload certificates carry a SPIFFE ID, no host name
    ctx.load_cert_chain(tmp / "client.crt", tmp / "client.key")
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number, sock


def _tls_proxy(options: envoy.BootstrapOptions, port: int, app_port: int) -> dict[str, Any]:
    """A listener on ``port`` terminating TLS with exactly the inbound listener's TLS context (SDS files and all),
    forwarding to ``app_port``: the capture listeners need iptables to be reached, the TLS context does not."""
    (inbound,) = [x for x in envoy.bootstrap(options)["static_resources"]["listeners"] if x["name"] == "inbound"]
    (tls,) = [c["transport_socket"] for c in inbound["filter_chains"] if "transport_socket" in c]
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    app = {"socket_address": {"address": "127.0.0.1", "port_value": app_port}}
    return {"node": {"id": "rotation-test", "cluster": "rotation-test"}, "static_resources": {
        "listeners": [{"name": "tls", "address": address, "filter_chains": [{"transport_socket": tls, "filters": [
            {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "tls", "cluster": "app"}}]}]}],
        "clusters": [{"name": "app", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": app}}]}]}}]}}


def test_a_rotated_certificate_is_served_to_new_handshakes_without_a_restart(tmp_path: Path) -> None:
    ca = certs.generate_ca("rotation test CA")
    volume = tmp_path / "certs"
    volume.mkdir()
    first = _volume(volume, ca, "v1")
    options = envoy.BootstrapOptions(cert_dir=str(volume), sds_dir=str(tmp_path / "sds"))
    envoy.write_sds_files(options.cert_dir, Path(options.sds_dir))
    app = socket.create_server(("127.0.0.1", 0))  # the app: accepts and holds connections
    port = free_port()
    config = json.dumps(_tls_proxy(options, port, app.getsockname()[1]))
    log = (tmp_path / "envoy.log").open("wb")
    proxy = subprocess.Popen([envoy_binary(), "--config-yaml", config, "--disable-hot-restart", "--base-id",
                              str(port), "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    client = certs.issue_workload(ca, "shop", "client")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                serial, held = _handshake(port, client, volume / certs.CA_CERT, tmp_path)
                break
            except OSError:
                assert proxy.poll() is None and time.monotonic() < deadline, (tmp_path / "envoy.log").read_text()
                time.sleep(0.2)
        assert serial == first.cert.serial_number
        second = _volume(volume, ca, "v2")
        deadline = time.monotonic() + 30
        while _handshake(port, client, volume / certs.CA_CERT, tmp_path)[0] != second.cert.serial_number:
            assert time.monotonic() < deadline, "new handshakes never got the rotated certificate"
            time.sleep(0.2)
        assert proxy.poll() is None  # no restart
        # The connection made before the rotation still carries bytes to the app.
        accepted, _ = app.accept()
        held.sendall(b"still here")
        accepted.settimeout(10)
        assert accepted.recv(64) == b"still here"
        accepted.close()
    finally:
        proxy.terminate()
        proxy.wait(30)
        log.close()
        app.close()

"""The real Envoy picks up a rotated workload certificate without a restart, and keeps open connections; and
a rotation of the mesh CA, step by step as meshguard carries it out, never fails a request between two proxies.

The certificate directory is laid out as the kubelet writes Secret and projected volumes (files behind a
``..data`` link that is swapped atomically); the proxy reads it through the SDS files meshguard-init writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.conftest import free_port
from tests.dataplane.tools import envoy_binary
from webhook import certs, envoy
from webhook.identity.authority import Timing, generate, step


def _volume(root: Path, ca: certs.Issued, version: str, bundle: bytes | None = None,
            account: str = "web") -> certs.Issued:
    """Write a workload pair from ``ca`` and the trust ``bundle`` (``ca`` alone by default) as the kubelet's atomic
    writer does: a new dir, then swap ``..data``."""
    issued = certs.issue_workload(ca, "shop", account)
    payload = root / f"..{version}"
    payload.mkdir()
    for name, data in ((certs.TLS_CERT, issued.cert_pem()), (certs.TLS_KEY, issued.key_pem()),
                       (certs.CA_CERT, bundle or ca.cert_pem())):
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


def _proxy(options: envoy.BootstrapOptions, listener: dict[str, Any], clusters: list[dict[str, Any]],
           log: Path, port: int) -> subprocess.Popen[bytes]:
    envoy.write_sds_files(options.cert_dir, Path(options.sds_dir))
    config = {"node": {"id": f"proxy-{port}", "cluster": "rotation-test"},
              "static_resources": {"listeners": [listener], "clusters": clusters}}
    return subprocess.Popen([envoy_binary(), "--config-yaml", json.dumps(config), "--disable-hot-restart",
                             "--base-id", str(port), "--log-level", "warn"], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def _echo_server() -> socket.socket:
    """The app behind the server's proxy: echoes one line per connection, in a thread."""
    app = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = app.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.sendall(conn.recv(64))

    threading.Thread(target=serve, daemon=True).start()
    return app


def _static(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": port}}}}]}]}}


def _request(port: int) -> bool:
    """One request through the client's proxy on a new connection (so a new mutual-TLS handshake upstream)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"ping\n")
            return sock.recv(64) == b"ping\n"
    except OSError:
        return False


def test_a_mesh_ca_rotation_step_by_step_never_fails_a_request(tmp_path: Path) -> None:
    """Two proxies, each with its own volume, updated one after the other (the kubelet refreshes pods at different
    moments) through every step meshguard's rotation takes, while a client keeps calling."""
    timing = Timing(validity=dt.timedelta(days=365), renew_before=dt.timedelta(days=10),
                    propagation=dt.timedelta(hours=1), lifetime=dt.timedelta(hours=24))
    phases = [generate(30)]
    now = phases[0].signing.cert.not_valid_after_utc - timing.renew_before
    for _ in range(3):  # successor trusted, successor signs, predecessor dropped
        phases.append((step(phases[-1], now, timing) or pytest.fail("no step due"))[0])
        now += timing.propagation + timing.lifetime + dt.timedelta(hours=1)  # the next step is due
    old, new = phases[0].signing.cert, phases[-1].signing.cert
    assert [p.trusted for p in phases] == [(old,), (old, new), (new, old), (new,)]

    volumes = {name: tmp_path / name for name in ("server", "client")}
    options = {name: envoy.BootstrapOptions(cert_dir=str(v), sds_dir=str(tmp_path / f"{name}-sds"))
               for name, v in volumes.items()}
    for name, volume in volumes.items():
        volume.mkdir()
        _volume(volume, phases[0].signing, "0", phases[0].bundle_pem(), account=name)
    app = _echo_server()
    server_port, client_port = free_port(), free_port()
    inbound = _tls_proxy(options["server"], server_port, app.getsockname()[1])["static_resources"]
    server = _proxy(options["server"], inbound["listeners"][0], inbound["clusters"], tmp_path / "server.log",
                    server_port)
    upstream = {**_static("server", server_port), "transport_socket": envoy.upstream_tls(
        options["client"], peer_ids=("spiffe://cluster.local/ns/shop/sa/server",))}
    outbound = {"name": "out", "address": {"socket_address": {"address": "127.0.0.1", "port_value": client_port}},
                "filter_chains": [{"filters": [envoy.tcp_proxy("out", "server")]}]}
    client = _proxy(options["client"], outbound, [upstream], tmp_path / "client.log", client_port)
    try:
        deadline = time.monotonic() + 60
        while not _request(client_port):
            assert server.poll() is None and client.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "server.log").read_text() + (tmp_path / "client.log").read_text()
            time.sleep(0.2)
        failures, sent, served = 0, 0, None
        for index, phase in enumerate(phases[1:], start=1):
            for name in ("server", "client"):  # one pod's volume is refreshed before the other's
                leaf = _volume(volumes[name], phase.signing, str(index), phase.bundle_pem(), account=name)
                served = leaf if name == "server" else served
                settle = time.monotonic() + 3  # Envoy reads the swapped files within a moment
                while time.monotonic() < settle:
                    sent += 1
                    failures += not _request(client_port)
        assert sent > 20 and failures == 0, f"{failures} of {sent} requests failed during the rotation"
        assert server.poll() is None and client.poll() is None  # no restart
        # The server now presents its certificate from the new CA, and no longer accepts the old CA's.
        ca_file = volumes["server"] / certs.CA_CERT
        serial, held = _handshake(server_port, certs.issue_workload(phases[-1].signing, "shop", "probe"), ca_file,
                                  tmp_path)
        held.close()
        assert served is not None and serial == served.cert.serial_number
        _, stale = _handshake(server_port, certs.issue_workload(phases[0].signing, "shop", "probe"), ca_file,
                              tmp_path)
        with pytest.raises(OSError):  # TLS 1.3: the server's refusal of the client certificate arrives on read
            stale.sendall(b"ping\n")
            if not stale.recv(64):
                raise ConnectionResetError("closed")
        stale.close()
    finally:
        for proxy in (server, client):
            proxy.terminate()
            proxy.wait(30)
        app.close()

"""Serving-certificate rotation the way Kubernetes Secret volumes do it, under a steady stream of requests."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
from cryptography import x509

from tests.conftest import RunningServer, review
from webhook import certs

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
       "spec": {"containers": [{"name": "app", "image": "nginx"}]}}


def _secret_volume(root: Path, ca: certs.Issued, version: str) -> x509.Certificate:
    """Write a serving pair as kubelet's atomic writer does: a new ..<version> dir, then swap the ..data link."""
    serving = certs.issue_serving(ca, "meshguard", "meshguard", dev=True)
    payload = root / f"..{version}"
    payload.mkdir()
    (payload / "tls.crt").write_bytes(serving.cert_pem())
    (payload / "tls.key").write_bytes(serving.key_pem())
    tmp = root / "..data_tmp"
    tmp.symlink_to(payload.name)
    os.replace(tmp, root / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")
    return serving.cert


def _peer_serial(server: RunningServer) -> int:
    host, port = server.url.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=server.ca)
    with socket.create_connection((host, int(port)), timeout=5) as sock, \
            ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_rotation_under_load_fails_no_request(server_factory, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    ca = certs.generate_ca()
    certs.write_pair(volume, ca, certs.CA_CERT, certs.CA_KEY)
    first = _secret_volume(volume, ca, "v1")
    srv = server_factory(config={"tls": {"cert_dir": str(volume), "reload_interval_seconds": 0.2}})
    assert _peer_serial(srv) == first.serial_number

    failures: list[str] = []
    answered = 0
    stop = threading.Event()
    body = review(POD, namespace="kube-system")

    def traffic(keep_alive: bool) -> None:
        nonlocal answered
        ctx = ssl.create_default_context(cafile=srv.ca)
        client = httpx.Client(base_url=srv.url, verify=ctx, timeout=10)
        while not stop.is_set():
            try:
                r = client.post("/validate", json=body)
                if r.status_code != 200 or r.json()["response"]["allowed"] is not True:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                answered += 1
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            if not keep_alive:  # a fresh connection (and handshake) for every request
                client.close()
                client = httpx.Client(base_url=srv.url, verify=ctx, timeout=10)
        client.close()

    threads = [threading.Thread(target=traffic, args=(keep,)) for keep in (True, False)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        second = _secret_volume(volume, ca, "v2")
        deadline = time.monotonic() + 15
        while _peer_serial(srv) != second.serial_number:
            assert time.monotonic() < deadline, "new connections never saw the rotated certificate"
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert answered > 10
    assert "serving certificate reloaded" in srv.logs()


def test_half_written_rotation_keeps_the_old_pair(server_factory, tmp_path: Path) -> None:
    srv = server_factory(config={"tls": {"reload_interval_seconds": 0.2}})
    before = _peer_serial(srv)
    # A key that does not match the certificate (as if caught between the two writes).
    (srv.cert_dir / "tls.key").write_bytes(certs.generate_ca().key_pem())
    deadline = time.monotonic() + 10
    while "keeping the previous one" not in srv.logs():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _peer_serial(srv) == before
    with srv.client() as client:
        assert client.post("/validate", json=review(POD, namespace="kube-system")).status_code == 200

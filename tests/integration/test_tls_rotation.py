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

    with Traffic(srv) as traffic:
        second = _secret_volume(volume, ca, "v2")
        _wait_for_serial(srv, second.serial_number)
    assert traffic.failures == []
    assert "serving certificate reloaded" in srv.logs()


class Traffic:
    """Admission requests in two threads while the ``with`` block runs: one on a kept-alive connection, one with
    a new connection (a new handshake) per request. Entering returns once both have had an answer."""

    def __init__(self, srv: RunningServer) -> None:
        self.srv = srv
        self.failures: list[str] = []
        self.answered = {True: threading.Event(), False: threading.Event()}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(keep,)) for keep in (True, False)]

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        for answered in self.answered.values():
            assert answered.wait(60), f"no answer before the rotation: {self.failures[:3]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _run(self, keep_alive: bool) -> None:
        body = review(POD, namespace="kube-system")
        ctx = ssl.create_default_context(cafile=self.srv.ca)
        client = httpx.Client(base_url=self.srv.url, verify=ctx, timeout=10)
        while not self.stop.is_set():
            try:
                r = client.post("/validate", json=body)
                if r.status_code != 200 or r.json()["response"]["allowed"] is not True:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
                self.answered[keep_alive].set()
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
            if not keep_alive:
                client.close()
                client = httpx.Client(base_url=self.srv.url, verify=ctx, timeout=10)
        client.close()


def _wait_for_serial(srv: RunningServer, serial: int) -> None:
    deadline = time.monotonic() + 30
    while _peer_serial(srv) != serial:
        assert time.monotonic() < deadline, "new connections never saw the rotated certificate"
        time.sleep(0.1)


def _wait_for_log(srv: RunningServer, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 30
    while srv.logs().count(text) < count:
        assert time.monotonic() < deadline, f"the server never logged {text!r}"
        time.sleep(0.1)


def test_certificate_replaced_before_its_key_fails_no_handshake(server_factory) -> None:
    """Files written one at a time (a tool, or a person, replacing tls.crt then tls.key): between the two writes
    the pair does not match, and the server must keep serving the old pair until the new one is whole."""
    srv = server_factory(config={"tls": {"reload_interval_seconds": 0.2}})
    ca = certs.load_pair(srv.cert_dir, certs.CA_CERT, certs.CA_KEY)
    before = _peer_serial(srv)
    new = certs.issue_serving(ca, "meshguard", "meshguard", dev=True)
    with Traffic(srv) as traffic:
        (srv.cert_dir / "tls.crt").write_bytes(new.cert_pem())
        _wait_for_log(srv, "keeping the previous one")  # the reloader saw the half-written pair
        assert _peer_serial(srv) == before
        (srv.cert_dir / "tls.key").write_bytes(new.key_pem())
        _wait_for_serial(srv, new.cert.serial_number)
    assert traffic.failures == []


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

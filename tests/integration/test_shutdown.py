"""SIGTERM: readiness flips first, an in-flight request still gets its answer, then the process exits."""

from __future__ import annotations

import signal
import socket
import ssl
import time

import httpx
import orjson

from tests.conftest import review

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
       "spec": {"containers": [{"name": "app", "image": "nginx"}]}}


def test_sigterm_drains_in_flight_requests(server_factory) -> None:
    srv = server_factory(config={"server": {"shutdown_delay_seconds": 1.0}})
    body = orjson.dumps(review(POD, namespace="kube-system", uid="in-flight"))
    host, port = srv.url.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=srv.ca)
    with socket.create_connection((host, int(port)), timeout=20) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        head = (f"POST /validate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        tls.sendall(head + body[:20])  # the request is now in flight, its body half sent

        srv.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.health_url}/readyz").status_code != 503:
            assert time.monotonic() < deadline, "readiness did not flip on SIGTERM"
            time.sleep(0.05)
        assert httpx.get(f"{srv.health_url}/readyz").json()["checks"]["accepting"] is False

        tls.sendall(body[20:])
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            chunk = tls.recv(65536)
            if not chunk:
                break
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    assert b" 200 " in status_line
    answer = orjson.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert answer["response"]["uid"] == "in-flight" and answer["response"]["allowed"] is True
    srv.process.wait(30)
    assert srv.process.returncode in (0, -signal.SIGTERM)
    # New connections are refused once the listener is closed.
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        refused = False
    except OSError:
        refused = True
    assert refused

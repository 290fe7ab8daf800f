"""Slow clients cannot exhaust the server: connections that trickle their request head or body are answered 408 and
closed at the deadline however steadily they trickle, connections stuck in the TLS handshake hold nothing else
up, and a normal client is answered all the while."""

from __future__ import annotations

import itertools
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import orjson
import pytest

from tests.conftest import RunningServer, review

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
       "spec": {"containers": [{"name": "app", "image": "nginx"}]}}
SLOW = 8  # connections of each kind
DEADLINE = 3.0  # the server's read timeout in this test, seconds
INTERVAL = 0.02  # between two bytes of a trickle: far shorter than the deadline


@dataclass
class Trickler:
    """One TLS connection sending ``payload`` a byte at a time, collecting whatever the server answers."""

    sock: ssl.SSLSocket
    payload: Iterator[bytes]
    received: bytes = b""
    closed: bool = False
    sent: int = 0

    def __post_init__(self) -> None:
        self.sock.setblocking(False)

    def step(self) -> None:
        if self.closed:
            return
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
            self.closed = True  # EOF: the server closed the connection
            return
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except OSError:
            self.closed = True
            return
        try:
            self.sock.sendall(next(self.payload))
            self.sent += 1
        except OSError:
            pass  # the server is closing; the next step reads what it answered


def head_bytes() -> Iterator[bytes]:
    """A request head that never ends: one header whose value grows a byte at a time."""
    yield from (bytes([b]) for b in b"POST /mutate HTTP/1.1\r\nHost: meshguard\r\nX-Slow: ")
    yield from itertools.repeat(b"a")


def body_bytes(content_length: int = 100_000) -> Iterator[bytes]:
    """A complete head announcing a body that then arrives a byte at a time."""
    yield b"POST /mutate HTTP/1.1\r\nHost: meshguard\r\nContent-Length: %d\r\n\r\n" % content_length
    yield from itertools.repeat(b" ")


def open_tls(server: RunningServer) -> ssl.SSLSocket:
    host, port = server.url.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=server.ca)
    return ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname="localhost")


@dataclass
class Load:
    """Normal requests on fresh connections, one after another, from a thread."""

    send: Callable[[], int]
    statuses: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.statuses.append(self.send())
            except Exception as exc:  # every failure is a finding
                self.errors.append(repr(exc))


@pytest.fixture
def slow_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory(config={"server": {"read_timeout_seconds": DEADLINE}})


def test_slow_clients_are_cut_off_while_others_are_served(slow_server: RunningServer) -> None:
    heads = [Trickler(open_tls(slow_server), head_bytes()) for _ in range(SLOW)]
    bodies = [Trickler(open_tls(slow_server), body_bytes()) for _ in range(SLOW)]
    host, port = slow_server.url.removeprefix("https://").split(":")
    # Stuck in the handshake: a TLS record header and nothing more (asyncio's 60 s handshake timeout ends them).
    handshakes = [socket.create_connection((host, int(port)), timeout=10) for _ in range(SLOW)]
    for sock in handshakes:
        sock.sendall(b"\x16\x03\x01")
    body = orjson.dumps(review(POD, namespace="kube-system"))

    def send() -> int:
        with slow_server.client() as client:  # 10 s timeout: a stalled server fails the request
            return client.post("/mutate", content=body).status_code

    load = Load(send)
    thread = threading.Thread(target=load.run)
    thread.start()
    tricklers = heads + bodies
    try:
        give_up = time.monotonic() + 60  # bounds the test only; the deadlines above are what is tested
        while not all(t.closed for t in tricklers) and time.monotonic() < give_up:
            for trickler in tricklers:
                trickler.step()
            time.sleep(INTERVAL)
    finally:
        load.stop.set()
        thread.join()
        for sock in [*handshakes, *(t.sock for t in tricklers)]:
            sock.close()

    assert load.errors == [] and load.statuses and set(load.statuses) == {200}
    for trickler in heads:
        # It kept trickling (a byte every INTERVAL, DEADLINE / INTERVAL = 150 chances): the deadline cut it anyway.
        assert trickler.closed and trickler.sent > 5
        head, _, answer = trickler.received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"connection: close" in head
        assert orjson.loads(answer)["error"] == f"request headers not received within {DEADLINE} seconds"
    for trickler in bodies:
        assert trickler.closed and trickler.sent > 5
        head, _, answer = trickler.received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"connection: close" in head
        assert orjson.loads(answer)["error"] == f"request body not received within {DEADLINE} seconds"
    # The application was told each trickling client had gone: it parsed no half body and answered nothing more.
    assert not [e for e in slow_server.log_entries() if e["msg"] == "rejected request body"]
    print(f"\nslowloris: {2 * SLOW} trickling connections answered 408 and closed, {SLOW} stuck handshakes, "
          f"{len(load.statuses)} normal requests meanwhile, all 200")


def test_an_idle_connection_is_closed_at_the_read_deadline(slow_server: RunningServer) -> None:
    with open_tls(slow_server) as sock:
        received = b""
        while chunk := sock.recv(65536):  # nothing sent: the server answers and closes, or recv times out
            received += chunk
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


def test_keep_alive_connections_serve_several_requests(slow_server: RunningServer) -> None:
    """The read deadline is per request: a connection reused after it would have passed still works."""
    body = orjson.dumps(review(POD, namespace="kube-system"))
    with slow_server.client() as client:
        first = client.post("/mutate", content=body)
        time.sleep(DEADLINE + 0.5)  # idle longer than the read deadline, shorter than keep-alive (30 s)
        second = client.post("/mutate", content=body)
    assert (first.status_code, second.status_code) == (200, 200)


def test_a_request_answered_early_gets_no_second_answer_at_the_deadline(slow_server: RunningServer) -> None:
    """413 on the announced size, then the client trickles the body it announced: the deadline closes the
    connection without writing a 408 after the 413."""
    trickler = Trickler(open_tls(slow_server), body_bytes(content_length=8 * 1024 * 1024))
    give_up = time.monotonic() + 60
    while not trickler.closed and time.monotonic() < give_up:
        trickler.step()
        time.sleep(INTERVAL)
    trickler.sock.close()
    assert trickler.closed and trickler.received.startswith(b"HTTP/1.1 413 ")
    assert trickler.received.count(b"HTTP/1.1 ") == 1

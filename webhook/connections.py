"""A read deadline for every request on the admission port, and a size cap for its head (slow and big clients).

uvicorn closes idle keep-alive connections, but sets no limit on how long a request may take to arrive, nor on
the size of its head (request line and headers): a client that opens TLS connections and trickles bytes holds each
one for ever, and one that streams headers without end grows the server's memory without bound. The event loop
serves every connection on its own, so other clients are answered meanwhile; the deadline and the cap are what
keep the number of open connections and the memory bounded.

The deadline is Go's ``http.Server.ReadTimeout``: the whole request, head and body, must arrive within it. It is
one timer per request, armed when the connection opens or the request's first byte arrives and cancelled when the
last arrives, so it costs nothing on top of what the head alone would. The TLS handshake is bounded by the event
loop's own ``ssl_handshake_timeout`` (60 seconds), which uvicorn does not expose.
"""

from __future__ import annotations

import asyncio
import http
import logging
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from .admission import encode_error

log = logging.getLogger("meshguard.admission")


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a head that is over the cap."""


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus: each request must arrive whole within ``read_timeout`` seconds of the
    connection opening or of the request's first byte, and its head be at most ``max_header_bytes`` long.
    Otherwise the client gets 408 or 431 (unless a response is already under way) and the connection is closed; an
    application waiting for the rest of the body is told the client has gone.

    Configure it with :func:`guarded_protocol`.
    """

    read_timeout: float
    max_header_bytes: int

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_bytes = 0
        self._head_done = False
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_done = False
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_done = True
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and not isinstance(cycle.transport, _HeadBuffer):
            # Created just now by uvicorn (unless it kept the previous one); its task has not run yet.
            cycle.transport = cast(asyncio.Transport, _HeadBuffer(cycle.transport, cycle))  # duck-typed

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # after a refusal the answer is already written and the connection closing
            super().send_400_response(msg)

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self.read_timeout, self._late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _late(self) -> None:
        self._timer = None
        part = "body" if self._head_done else "headers"
        self._refuse(408, f"request {part} not received within {self.read_timeout} seconds")

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            self._refuse(431, f"request line and headers exceed {self.max_header_bytes} bytes")
            raise _Refused

    def _refuse(self, status: int, message: str) -> None:
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._disarm()
        log.info("refused a request", extra={"status": status, "error": message,
                                              "client": ":".join(map(str, self.client or ()))})
        # The request being read has a cycle once its head is done; before that, self.cycle is the previous one.
        cycle = self.cycle if self._head_done else None
        previous = None if self._head_done else self.cycle
        if (cycle is None or not cycle.response_started) and (previous is None or previous.response_complete):
            body = encode_error(status, message)
            head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
            self.transport.write(head.encode("ascii") + body)
        if cycle is not None:  # the application may be waiting for the body: it is not coming
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


class _HeadBuffer:
    """The transport as one request/response cycle sees it: the response's first write, its head, is held and goes
    out with the next, its body.

    uvicorn writes a response's head and body separately; over TLS each write is a record and a system call, and
    on loopback a send also pays for the receiver's TCP processing (the measured cost is in
    docs/benchmarks.md#speed-tricks). Writes before the response starts (``100 Continue``) pass at once, and a
    head still held when the connection closes (the application failed before its body) goes out first.
    Everything but ``write`` and ``close`` passes through unchanged.
    """

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        # Until the head is seen. Dropped then: the cycle refers to this buffer, and a reference cycle on every
        # request would leave each request's objects to the garbage collector instead of freeing them at once.
        self._cycle: RequestResponseCycle | None = cycle
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif self._cycle is not None and self._cycle.response_started:
            self._head, self._cycle = data, None
            return
        self._transport.write(data)

    def close(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def guarded_protocol(read_timeout: float, max_header_bytes: int) -> type[GuardedProtocol]:
    """The protocol class to pass to ``uvicorn.Config(http=...)``, with these limits."""
    limits = {"read_timeout": read_timeout, "max_header_bytes": max_header_bytes}
    return type("GuardedProtocol", (GuardedProtocol,), limits)

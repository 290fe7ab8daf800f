"""A deadline and a size cap for the head of every request on the admission port (slow and oversized clients).

uvicorn closes idle keep-alive connections, but sets no limit on how long a request's head (request line and
headers) may take to arrive, nor on its size: a client that opens TLS connections and trickles header bytes holds
each one for ever, and one that streams headers without end grows the server's memory without bound. asyncio
serves every connection on its own, so other clients are answered meanwhile; the deadline and the cap are what
keep the number of open connections and the memory bounded.

The body has its own deadline (``AdmissionApp._read_body``). The TLS handshake is bounded by asyncio's own
``ssl_handshake_timeout`` (60 seconds), which uvicorn does not expose.
"""

from __future__ import annotations

import asyncio
import http
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .admission import encode_error

log = logging.getLogger("meshguard.admission")


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a head that is over the cap."""


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus: each request's head must arrive within ``header_timeout`` seconds of
    the connection opening or of the request's first byte, and be at most ``max_header_bytes`` long; otherwise the
    client gets 408 or 431 (when no response is under way) and the connection is closed.

    Configure it with :func:`guarded_protocol`.
    """

    header_timeout: float
    max_header_bytes: int

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # after a refusal the answer is already written and the connection closing
            super().send_400_response(msg)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _late(self) -> None:
        self._head_timer = None
        self._refuse(408, f"request headers not received within {self.header_timeout} seconds")

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
        log.info("refused a request head", extra={"status": status, "error": message,
                                                   "client": ":".join(map(str, self.client or ()))})
        if self.cycle is None or self.cycle.response_complete:  # never cut into a response being written
            body = encode_error(status, message)
            head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
            self.transport.write(head.encode("ascii") + body)
        self.transport.close()


def guarded_protocol(header_timeout: float, max_header_bytes: int) -> type[GuardedProtocol]:
    """The protocol class to pass to ``uvicorn.Config(http=...)``, with these limits."""
    limits = {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes}
    return type("GuardedProtocol", (GuardedProtocol,), limits)

"""Serving a request must not leave reference cycles behind: the cyclic garbage collector would then run every few
hundred requests and its pauses show up as the latency tail (a per-request cycle once raised the sequential p99
of /mutate by a third)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from webhook.connections import guarded_protocol

REQUESTS = 300


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _garbage_after_requests(count: int) -> int:
    """Objects the cyclic collector frees after ``count`` keep-alive requests through the guarded protocol."""
    config = uvicorn.Config(_app, lifespan="off", access_log=False, log_config=None)
    config.load()
    protocol, state = guarded_protocol(10.0, 16384), ServerState()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: protocol(config, state, {}), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def one() -> None:
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and await reader.readexactly(2) == b"ok"

    try:
        for _ in range(20):  # first-use allocations (caches, the connection itself) are not per request
            await one()
        gc.collect()
        gc.disable()
        try:
            for _ in range(count):
                await one()
            return gc.collect()
        finally:
            gc.enable()
    finally:
        writer.close()
        server.close()


def test_served_requests_leave_no_reference_cycles() -> None:
    found = asyncio.run(_garbage_after_requests(REQUESTS))
    assert found < REQUESTS // 10, f"{found} objects in reference cycles after {REQUESTS} requests"

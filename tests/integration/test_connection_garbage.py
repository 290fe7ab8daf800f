"""Serving a request must not leave reference cycles behind: the cyclic garbage collector would then run every few
hundred requests and its pauses show up as the latency tail (a per-request cycle once raised the sequential p99
of /mutate by a third). Checked for the connection layer and for the admission path, with the collector off."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvicorn
from uvicorn.server import ServerState

from tests.conftest import review
from webhook import config
from webhook.connections import guarded_protocol
from webhook.metrics import Metrics
from webhook.server import AdmissionApp
from webhook.service import build_webhooks
from webhook.state.store import Store

REQUESTS = 300
LIMIT = REQUESTS // 10  # a cycle per request leaves thousands of objects; none is expected


async def _collected_after(count: int, step: Callable[[], Awaitable[None]]) -> int:
    """Objects the cyclic collector frees after ``count`` awaits of ``step`` (after a warm-up: first-use
    allocations, caches and the connection itself, are not per request)."""
    for _ in range(20):
        await step()
    gc.collect()
    gc.disable()
    try:
        for _ in range(count):
            await step()
        return gc.collect()
    finally:
        gc.enable()


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _through_the_guarded_protocol(count: int) -> int:
    config = uvicorn.Config(_app, lifespan="off", access_log=False, log_config=None)
    config.load()
    protocol, state = guarded_protocol(10.0, 16384), ServerState()
    server = await asyncio.get_running_loop().create_server(lambda: protocol(config, state, {}), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])

    async def request() -> None:  # keep-alive: every request on the one connection
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and await reader.readexactly(2) == b"ok"

    try:
        return await _collected_after(count, request)
    finally:
        writer.close()
        server.close()


def test_served_requests_leave_no_reference_cycles() -> None:
    found = asyncio.run(_through_the_guarded_protocol(REQUESTS))
    assert found < LIMIT, f"{found} objects in reference cycles after {REQUESTS} requests"


def test_admissions_leave_no_reference_cycles() -> None:
    settings = config.load(None, {"dev": True})
    metrics = Metrics()
    webhooks = build_webhooks(settings, metrics, Store(metrics=metrics))
    app = AdmissionApp(webhooks, metrics, 1 << 20)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "web-", "labels": {"app": "web"}},
           "spec": {"containers": [{"name": "app", "image": "nginx", "env": [{"name": "A", "value": "1"}]}]}}
    body = orjson.dumps(review(pod, namespace="shop"))
    # The mutate answer carries a patch; the validate answer denies (no NetworkPolicy), with its messages.
    for name, expect in (("mutate", b'"patchType"'), ("validate", b'"allowed":false')):

        async def admit(name: str = name, expect: bytes = expect) -> None:
            status, answer = await app.admit(name, webhooks[name], body)
            assert status == 200 and expect in answer

        found = asyncio.run(_collected_after(REQUESTS, admit))
        assert found < LIMIT, f"/{name}: {found} objects in reference cycles after {REQUESTS} admissions"

"""HTTP edges: the HTTPS admission app, the plain-HTTP health app, and running both under uvicorn.

The admission port is a bare ASGI callable rather than a FastAPI route: every pod creation in the cluster goes
through it, and a framework's per-request routing, dependency injection and validation would cost more than
the admission decision itself. It does only what the wire needs: method and path check, a size-capped body
read, decode, call the handler, encode. The health app is FastAPI, where convenience matters more than
microseconds.

Handlers are ``async def handler(request: AdmissionRequest) -> AdmissionResponse``. They should not raise; if
one does, the request is answered with the webhook's configured failure mode and the traceback goes to the
log, never to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .admission import (
    AdmissionRequest,
    AdmissionResponse,
    ReviewError,
    encode_error,
    encode_response,
    errored,
    parse_envelope,
    parse_request,
)
from .config import Settings
from .connections import guarded_protocol
from .logs import EventLog
from .metrics import Metrics, kind_label, operation_label
from .tls import CertificateReloader

log = logging.getLogger("meshguard.admission")
# The one-line-per-admission log, written without building a LogRecord (it is on every request's path).
_events = EventLog(log)

Handler = Callable[[AdmissionRequest], Awaitable[AdmissionResponse]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

_JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass
class Readiness:
    """Named conditions that must all hold before the pod takes admission traffic (``/readyz``)."""

    conditions: dict[str, bool] = field(default_factory=dict)

    def set(self, name: str, ok: bool) -> None:
        self.conditions[name] = ok

    @property
    def ready(self) -> bool:
        return bool(self.conditions) and all(self.conditions.values())


@dataclass(frozen=True)
class Webhook:
    """One admission endpoint: its handler and whether an unexpected failure allows the request."""

    handler: Handler
    allow_on_error: bool


class _ClientGone(Exception):
    """The client's connection ended before its request body did."""


class AdmissionApp:
    """ASGI app serving ``POST /<name>`` for each webhook (``/mutate``, ``/validate``)."""

    def __init__(self, webhooks: Mapping[str, Webhook], metrics: Metrics, max_body_bytes: int) -> None:
        self._routes = {f"/{name}": (name, hook) for name, hook in webhooks.items()}
        self._metrics = metrics
        self._max_body = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        route = self._routes.get(scope["path"])
        if route is None:
            await _respond(send, 404, encode_error(404, f"no admission webhook at {scope['path']}"))
            return
        if scope["method"] != "POST":
            await _respond(send, 405, encode_error(405, "admission webhooks accept POST only"), [(b"allow", b"POST")])
            return
        name, hook = route
        try:
            body = await self._read_body(scope, receive)
        except _ClientGone:
            return  # it left, or its connection was cut at the read deadline (408): nobody to answer
        if body is None:
            self._metrics.rejected_bodies.labels(name, "413").inc()
            limit = f"request body exceeds the {self._max_body} byte limit"
            await _respond(send, 413, encode_error(413, limit))
            return
        status, payload = await self.admit(name, hook, body)
        await _respond(send, status, payload)

    async def _read_body(self, scope: dict[str, Any], receive: Receive) -> bytes | None:
        """The whole body, or None once it is known to exceed the cap (stops reading right there).

        Raises ``_ClientGone`` when the connection ends before the body does.
        """
        for key, value in scope["headers"]:
            if key == b"content-length":
                with contextlib.suppress(ValueError):
                    if int(value) > self._max_body:
                        return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def admit(self, name: str, hook: Webhook, body: bytes) -> tuple[int, bytes]:
        """Decode, decide, encode. Returns (HTTP status, body). Never raises."""
        start = time.perf_counter()
        self._metrics.body_bytes.labels(name).observe(len(body))
        try:
            uid, raw = parse_envelope(body)
        except ReviewError as exc:
            self._metrics.rejected_bodies.labels(name, str(exc.status)).inc()
            log.info("rejected request body", extra={"webhook": name, "status": exc.status, "error": exc.message})
            return exc.status, encode_error(exc.status, exc.message)
        request: AdmissionRequest | None = None
        try:
            request = parse_request(uid, raw)
        except ValueError as exc:
            response = errored(f"meshguard could not read this AdmissionReview: {exc}", hook.allow_on_error, code=400)
        else:
            try:
                response = await hook.handler(request)
            except Exception:
                log.exception("admission handler failed", extra={"webhook": name, "uid": uid})
                response = errored(
                    f"meshguard failed to evaluate this request (uid {uid}); see the meshguard logs",
                    hook.allow_on_error,
                )
        payload = encode_response(uid, response)
        try:
            self._record(name, request, uid, response, time.perf_counter() - start)
        except Exception:  # observability must never turn an answer into an error
            log.exception("recording an admission failed", extra={"webhook": name, "uid": uid})
        return 200, payload

    def _record(
        self, name: str, request: AdmissionRequest | None, uid: str, response: AdmissionResponse, seconds: float
    ) -> None:
        kind = request.kind if request else "unknown"
        operation = request.operation if request else "unknown"
        decision = _decision(response)
        labels = (name, kind_label(kind), operation_label(operation), decision)
        self._metrics.requests.labels(*labels).inc()
        self._metrics.duration.labels(*labels).observe(seconds)
        if not _events.enabled():
            return
        fields = {
            "webhook": name,
            "uid": uid,
            "kind": kind,
            "namespace": request.namespace if request else "",
            "object": request.name if request else "",
            "operation": operation,
            "dry_run": request.dry_run if request else False,
            "decision": decision,
            "reason": response.reason,
            "duration_ms": round(seconds * 1000, 3),
        }
        if response.message:
            fields["status_message"] = response.message
        if response.details:
            fields.update(response.details)
        _events.write("admission", fields)


def _decision(response: AdmissionResponse) -> str:
    if response.reason == "error":
        return "error"
    if not response.allowed:
        return "denied"
    return "patched" if response.patch else "allowed"


async def _respond(send: Send, status: int, body: bytes, extra_headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


ProxyConfig = Callable[[str, str], dict[str, Any] | None]
LOOPBACK = frozenset({"127.0.0.1", "::1"})


def build_health_app(readiness: Readiness, metrics: Metrics, proxy_config: ProxyConfig | None = None) -> FastAPI:
    """``/healthz`` (the process answers), ``/readyz`` (ready for admission traffic), ``/metrics``, and with the
    control plane ``/debug/proxy-config/<namespace>/<pod>`` (from loopback only: ``kubectl port-forward``)."""
    app = FastAPI(title="meshguard health", docs_url=None, redoc_url=None, openapi_url=None)

    if proxy_config is not None:
        describe = proxy_config

        @app.get("/debug/proxy-config/{namespace}/{pod}")
        async def proxy_config_of(namespace: str, pod: str, request: Request) -> JSONResponse:
            if request.client is None or request.client.host not in LOOPBACK:
                return JSONResponse({"error": "proxy configs are served to loopback only (kubectl port-forward)"},
                                    status_code=403)
            found = describe(namespace, pod)
            if found is None:
                return JSONResponse({"error": f"no proxy of pod {namespace}/{pod} is connected to this replica"},
                                    status_code=404)
            return JSONResponse(found)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        body = {"ready": readiness.ready, "checks": dict(readiness.conditions)}
        return JSONResponse(body, status_code=200 if readiness.ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    return app


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the admission server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class _AdmissionServer(uvicorn.Server):
    """Flips readiness on SIGTERM/SIGINT, waits ``delay`` seconds, then drains like uvicorn does."""

    def __init__(self, config: uvicorn.Config, readiness: Readiness, delay: float) -> None:
        super().__init__(config)
        self._readiness = readiness
        self._delay = delay
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._readiness.set("accepting", False)
        if self.should_exit or not self._delay or self._loop is None:
            super().handle_exit(sig, frame)
            return
        log.info("shutting down: not ready, draining", extra={"delay_seconds": self._delay})
        self._loop.call_soon_threadsafe(self._loop.call_later, self._delay, super().handle_exit, sig, frame)


# Both listeners: no ASGI lifespan, no access log (the admission line replaces it), logging left to logs.py, and
# no X-Forwarded-* handling: the API server and Prometheus connect directly, so the headers could only be spoofed
# (uvicorn trusts them from loopback by default), and reading them is work on every request.
_UVICORN_DEFAULTS: dict[str, Any] = {"lifespan": "off", "access_log": False, "log_config": None,
                                     "server_header": False, "proxy_headers": False}


async def run(
    settings: Settings,
    webhooks: Mapping[str, Webhook],
    readiness: Readiness,
    metrics: Metrics,
    background: Iterable[Callable[[], Coroutine[Any, Any, None]]] = (),
    proxy_config: ProxyConfig | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT: the admission app over TLS and the health app over HTTP."""
    reloader = CertificateReloader(
        settings.tls, on_loaded=lambda cert: metrics.certificate_expiry.set(cert.not_valid_after_utc.timestamp()),
        on_expiry_checked=metrics.certificate_expiring.set,
        on_valid=lambda valid: readiness.set("certificates", valid),
    )
    readiness.set("accepting", True)
    admission_config = uvicorn.Config(
        AdmissionApp(webhooks, metrics, settings.server.max_body_bytes),
        http=guarded_protocol(settings.server.read_timeout_seconds, settings.server.max_header_bytes),
        host=settings.server.host,
        port=settings.server.port,
        **_UVICORN_DEFAULTS,
        timeout_keep_alive=int(settings.server.keepalive_timeout_seconds),
        timeout_graceful_shutdown=int(settings.server.graceful_timeout_seconds),
        ssl_context_factory=lambda _config, _default: reloader.context,
    )
    health_config = uvicorn.Config(
        build_health_app(readiness, metrics, proxy_config),
        host=settings.server.health_host,
        port=settings.server.health_port,
        **_UVICORN_DEFAULTS,
    )
    admission = _AdmissionServer(admission_config, readiness, settings.server.shutdown_delay_seconds)
    health = _QuietServer(health_config)
    tasks = [asyncio.create_task(reloader.watch()), *(asyncio.create_task(job()) for job in background)]
    health_task = asyncio.create_task(health.serve())
    try:
        await admission.serve()
    finally:
        health.should_exit = True
        await health_task
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _events.flush()


__all__ = ["AdmissionApp", "Handler", "Readiness", "Webhook", "build_health_app", "run"]

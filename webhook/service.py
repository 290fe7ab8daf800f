"""Wiring: turn the settings into webhooks, cluster state and background jobs, then serve.

This is the one place that knows which handler answers which path; the server knows only ``Webhook`` values
and the handlers know nothing of HTTP.
"""

from __future__ import annotations

import logging

from .admission import AdmissionRequest, AdmissionResponse, allowed
from .certs import ensure_dev_certs
from .config import Settings
from .injection.handler import mutate_handler
from .metrics import Metrics
from .server import Readiness, Webhook, run

log = logging.getLogger("meshguard")

SERVICE_NAME = "meshguard"


async def _allow(request: AdmissionRequest) -> AdmissionResponse:
    return allowed(reason="no-rules")


def build_webhooks(settings: Settings, metrics: Metrics) -> dict[str, Webhook]:
    return {
        "mutate": Webhook(mutate_handler(settings, metrics), allow_on_error=settings.failure.mutate == "allow"),
        "validate": Webhook(_allow, allow_on_error=settings.failure.validate_ == "allow"),
    }


async def serve(settings: Settings) -> None:
    if settings.dev and ensure_dev_certs(settings.tls.cert_dir, SERVICE_NAME, settings.namespace):
        log.info("generated development certificates", extra={"cert_dir": str(settings.tls.cert_dir)})
    metrics = Metrics()
    readiness = Readiness()
    log.info(
        "starting",
        extra={
            "admission": f"https://{settings.server.host}:{settings.server.port}",
            "health": f"http://{settings.server.health_host}:{settings.server.health_port}",
            "dev": settings.dev,
        },
    )
    await run(settings, build_webhooks(settings, metrics), readiness, metrics)

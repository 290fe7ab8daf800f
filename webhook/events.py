"""Kubernetes Events for what users should see without reading meshguard's logs: denials, policy warnings, and
pods in the mesh left without the sidecar, on the object itself (``kubectl describe``, ``kubectl get events``).

The request path only appends to a bounded queue (a full queue drops the event and counts it); a background job
posts the queue in a worker thread. The same event for the same object is posted once per ``REPEAT_SECONDS``, so
a controller retrying a denied pod every few seconds does not flood the namespace. Dry-run requests and objects
without a name (a controller's pods before the API server names them: the controller's own FailedCreate event
already carries meshguard's message) get none.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import kubejson
from .admission import AdmissionRequest, AdmissionResponse
from .errors import KubeError
from .injection.decision import MESSAGES
from .metrics import Metrics
from .policy.handler import POLICY_WARN
from .server import Handler
from .workloads import WORKLOAD_KINDS

log = logging.getLogger("meshguard.events")

CONTROLLER = "meshguard.io/meshguard"
QUEUE_SIZE = 1000
REPEAT_SECONDS = 600.0
NOTE_LIMIT = 1024  # the API server refuses longer notes
# Injection skips a user did not ask for (an opt-out is a choice, not news).
NOTABLE_SKIPS = frozenset({"host-network", "other-mesh"})


@dataclass(frozen=True, slots=True)
class Event:
    namespace: str
    kind: str
    api_version: str
    name: str
    type: str  # Normal | Warning
    reason: str
    action: str
    note: str


def event_for(webhook: str, request: AdmissionRequest, response: AdmissionResponse) -> Event | None:
    """The event an answer deserves, if any (a pure function of the request and the answer)."""
    if request.dry_run or not request.name or request.kind not in WORKLOAD_KINDS:
        return None
    kind = WORKLOAD_KINDS[request.kind]
    api_version = kind.api_version

    def made(type_: str, reason: str, action: str, note: str) -> Event:
        return Event(request.namespace, request.kind, api_version, request.name, type_, reason, action,
                     note[:NOTE_LIMIT])

    if webhook == "validate":
        if not response.allowed and response.message:
            return made("Warning", "PolicyDenied", "Validate", response.message)
        if response.reason == POLICY_WARN and response.warnings:
            return made("Warning", "PolicyWarning", "Validate", "\n".join(response.warnings))
        return None
    if not response.allowed and response.message:
        return made("Warning", "InjectionDenied", "Inject", response.message)
    if response.reason in NOTABLE_SKIPS:
        return made("Normal", "InjectionSkipped", "Inject", f"meshguard did not inject the sidecar: "
                                                             f"{MESSAGES[response.reason]}")
    return None


class EventRecorder:
    def __init__(self, client: Any, metrics: Metrics, instance: str | None = None) -> None:
        self._client = client
        self._metrics = metrics
        self._instance = instance or os.environ.get("HOSTNAME", "meshguard")
        self._queue: collections.deque[Event] = collections.deque()
        self._posted: collections.OrderedDict[Event, float] = collections.OrderedDict()
        self._wake = asyncio.Event()

    def observe(self, webhook: str, request: AdmissionRequest, response: AdmissionResponse) -> None:
        event = event_for(webhook, request, response)
        if event is None:
            return
        last = self._posted.get(event)
        if last is not None and time.monotonic() - last < REPEAT_SECONDS:
            return
        if len(self._queue) >= QUEUE_SIZE:
            self._metrics.events.labels("dropped").inc()
            return
        self._posted[event] = time.monotonic()
        self._posted.move_to_end(event)
        while len(self._posted) > QUEUE_SIZE * 10:
            self._posted.popitem(last=False)
        self._queue.append(event)
        self._wake.set()

    async def run(self) -> None:
        """Post queued events until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch = list(self._queue)
            self._queue.clear()
            for event in batch:
                try:
                    await asyncio.to_thread(kubejson.call, self._client, "POST",
                                            f"/apis/events.k8s.io/v1/namespaces/{event.namespace}/events",
                                            self._body(event))
                    self._metrics.events.labels("posted").inc()
                except KubeError as exc:
                    self._metrics.events.labels("failed").inc()
                    log.warning("event not posted", extra={"reason": event.reason, "object": event.name,
                                                           "error": str(exc)})

    def _body(self, event: Event) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            # Named as client-go's recorder names them (a generateName may not end in "."): object and time.
            "metadata": {"name": f"{event.name}.{time.time_ns():x}", "namespace": event.namespace},
            "eventTime": now, "reportingController": CONTROLLER, "reportingInstance": self._instance,
            "action": event.action, "reason": event.reason, "type": event.type, "note": event.note,
            "regarding": {"apiVersion": event.api_version, "kind": event.kind, "namespace": event.namespace,
                          "name": event.name},
        }


Observer = Callable[[str, AdmissionRequest, AdmissionResponse], None]


def recording(handler: Handler, webhook: str, observe: Observer) -> Handler:
    """``handler``, with every answer shown to ``observe`` (which must not block)."""

    async def handle(request: AdmissionRequest) -> AdmissionResponse:
        response = await handler(request)
        observe(webhook, request, response)
        return response

    return handle

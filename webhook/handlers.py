"""The handler chain every admission request goes through, named in one place.

The server calls a :data:`~webhook.server.Handler` with the parsed request. :func:`chain` makes one from a
webhook's :data:`WorkloadHandler`: it reads the request's object as a workload once (every layer after it reuses
that), refuses it when it is over a limit (:mod:`webhook.limits`), and hands it on. ``service.build_webhooks``
composes the chains: ``/mutate`` is ``chain(mutate_handler)``, ``/validate`` is
``chain(report_unmeshed(policy handler))``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .admission import AdmissionRequest, AdmissionResponse, denied
from .config import LimitSettings
from .limits import OVER_LIMIT, problem
from .server import Handler
from .workloads import Workload, as_workload

# A webhook's handler, given the request's object already read as a workload (None when it is not one).
WorkloadHandler = Callable[[AdmissionRequest, Workload | None], Awaitable[AdmissionResponse]]


def chain(handler: WorkloadHandler, limits: LimitSettings) -> Handler:
    """The server's handler: reads the request's object as a workload, denies it (code 400) without looking
    further when it is over a limit, else passes it to ``handler``."""

    async def handle(request: AdmissionRequest) -> AdmissionResponse:
        obj = request.object
        workload = as_workload(obj, request.namespace) if obj is not None else None
        found = problem(workload, limits) if workload is not None else None
        if found is not None:
            return denied(found, reason=OVER_LIMIT, code=400)
        return await handler(request, workload)

    return handle

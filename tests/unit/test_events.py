"""Which answers become Kubernetes Events, and that the request path never waits for one or floods a namespace."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from webhook.admission import AdmissionRequest, allowed, denied
from webhook.events import QUEUE_SIZE, EventRecorder, event_for
from webhook.metrics import Metrics


def request(name: str = "payment", kind: str = "Deployment", dry_run: bool = False) -> AdmissionRequest:
    group = "" if kind == "Pod" else "apps"
    return AdmissionRequest(uid="u", kind=kind, group=group, operation="CREATE", namespace="shop", name=name,
                            object={}, old_object=None, dry_run=dry_run)


def test_denials_warnings_and_notable_skips_become_events() -> None:
    denial = event_for("validate", request(), denied("Deployment shop/payment: no NetworkPolicy selects it",
                                                     reason="policy-violation"))
    assert denial is not None
    assert (denial.type, denial.reason, denial.kind, denial.api_version) == ("Warning", "PolicyDenied",
                                                                            "Deployment", "apps/v1")
    assert denial.note == "Deployment shop/payment: no NetworkPolicy selects it"
    warning = event_for("validate", request(), allowed(reason="policy-warn", warnings=("mTLS is PERMISSIVE",)))
    assert warning is not None and (warning.reason, warning.note) == ("PolicyWarning", "mTLS is PERMISSIVE")
    skipped = event_for("mutate", request("web-1", "Pod"), allowed(reason="host-network"))
    assert skipped is not None and skipped.type == "Normal" and skipped.reason == "InjectionSkipped"
    assert "hostNetwork" in skipped.note
    refused = event_for("mutate", request("web-1", "Pod"), denied("bad annotation", reason="invalid-override",
                                                                  code=400))
    assert refused is not None and refused.reason == "InjectionDenied"


def test_quiet_answers_dry_runs_and_unnamed_objects_get_none() -> None:
    assert event_for("validate", request(), allowed(reason="policy-pass")) is None
    assert event_for("mutate", request("web-1", "Pod"), allowed(reason="opt-out-label")) is None  # a choice
    assert event_for("validate", request(dry_run=True), denied("x", reason="policy-violation")) is None
    assert event_for("validate", request(name=""), denied("x", reason="policy-violation")) is None
    assert event_for("validate", request(kind="ConfigMap"), denied("x", reason="policy-violation")) is None


class FakeClient:
    """Stands in for the API client: what the recorder posts (kubejson is exercised against a real API server by
    the end-to-end tests)."""


def test_the_same_event_is_queued_once_and_a_full_queue_drops(monkeypatch: Any) -> None:
    posted: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr("webhook.events.kubejson.call", lambda client, method, path, body: posted.append((path, body)))

    async def scenario() -> None:
        metrics = Metrics()
        recorder = EventRecorder(FakeClient(), metrics, instance="meshguard-0")
        task = asyncio.create_task(recorder.run())
        answer = denied("Deployment shop/payment: no NetworkPolicy selects it", reason="policy-violation")
        for _ in range(5):  # a controller retrying
            recorder.observe("validate", request(), answer)
        while not posted:
            await asyncio.sleep(0.01)
        assert len(posted) == 1
        path, body = posted[0]
        assert path == "/apis/events.k8s.io/v1/namespaces/shop/events"
        assert body["regarding"] == {"apiVersion": "apps/v1", "kind": "Deployment", "namespace": "shop",
                                     "name": "payment"}
        # Named like client-go's events (the API server refuses a generateName ending in ".").
        assert re.fullmatch(r"payment\.[0-9a-f]+", body["metadata"]["name"]) and "generateName" not in body["metadata"]
        assert body["reportingController"] == "meshguard.io/meshguard" and body["reportingInstance"] == "meshguard-0"
        assert body["type"] == "Warning" and body["reason"] == "PolicyDenied" and body["action"] == "Validate"
        task.cancel()
        # Without the poster running, the queue fills and then drops (counted), never blocking the caller.
        for n in range(QUEUE_SIZE + 5):
            recorder.observe("validate", request(f"w-{n}"), answer)
        assert metrics.events.labels("dropped").value == 5

    asyncio.run(scenario())

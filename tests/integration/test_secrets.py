"""Secrets never leak: an env value and an annotation that look like secrets, and the pod spec itself, appear in no
answer and in no log line, at debug level, on every path through both webhooks (allowed, patched, denied, invalid
override, name conflict, over a limit, malformed request)."""

from __future__ import annotations

import base64
import copy
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tests.conftest import RunningServer, as_injected, review, start_server
from tests.integration.test_validate import MESH, deny_all, namespace, write_state

PASSWORD = f"hunter2-{uuid.uuid4().hex}"
TOKEN = f"s3cr3t-token-{uuid.uuid4().hex}"
IMAGE = f"registry.example.com/payments-{uuid.uuid4().hex}:1"  # marks the pod spec: it must never be logged
SECRETS = (PASSWORD, TOKEN, IMAGE)
REPLICASET_CONTROLLER = "system:serviceaccount:kube-system:replicaset-controller"
OWNER = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "pay-1", "uid": "u", "controller": True}]


def template(**annotations: str) -> dict[str, Any]:
    return {"metadata": {"labels": {"app": "pay"},
                         "annotations": {"vault.example.com/db-password": TOKEN, **annotations}},
            "spec": {"containers": [{"name": "pay", "image": IMAGE,
                                     "env": [{"name": "DB_PASSWORD", "value": PASSWORD},
                                             {"name": "API_TOKEN", "value": TOKEN}]}]}}


def pod(owned: bool = False, **annotations: str) -> dict[str, Any]:
    tpl = template(**annotations)
    meta = {"name": "pay", **tpl["metadata"], **({"ownerReferences": OWNER} if owned else {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": tpl["spec"]}


def deployment() -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "pay"},
            "spec": {"selector": {"matchLabels": {"app": "pay"}}, "template": template()}}


def reserved_name() -> dict[str, Any]:
    obj = pod()
    obj["spec"]["initContainers"] = [{"name": "meshguard-init", "image": IMAGE}]
    return obj


def over_limit() -> dict[str, Any]:
    obj = pod()
    obj["metadata"]["labels"] = {f"k{i}": PASSWORD for i in range(1001)}
    return obj


def injected() -> dict[str, Any]:
    return as_injected(pod(owned=True))


CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("mutate: injected", "/mutate", pod(), {"namespace": "shop"}),
    ("mutate: invalid override", "/mutate", pod(**{"meshguard.io/proxy-cpu": "fast"}), {"namespace": "shop"}),
    ("mutate: name conflict", "/mutate", reserved_name(), {"namespace": "shop"}),
    ("mutate: over a limit", "/mutate", over_limit(), {"namespace": "shop"}),
    ("mutate: skipped", "/mutate", pod(**{"meshguard.io/inject": "false"}), {"namespace": "shop"}),
    ("validate: allowed", "/validate", injected(), {"namespace": "shop", "user": REPLICASET_CONTROLLER}),
    ("validate: denied", "/validate", deployment(), {"namespace": "bare"}),
    ("validate: warned, un-meshed", "/validate", pod(owned=True), {"namespace": "shop", "user": REPLICASET_CONTROLLER}),
    ("validate: update", "/validate", deployment(), {"namespace": "bare", "operation": "UPDATE", "old": deployment()}),
    ("validate: over a limit", "/validate", over_limit(), {"namespace": "shop"}),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("secrets")
    state = write_state(work / "state", [namespace("shop", **MESH), deny_all("shop")])
    running = start_server(work, config={"log_level": "debug"}, args=("--state", str(state)))
    yield running
    running.stop()


def visible(answer: bytes) -> str:
    """The answer as a person would read it: the JSON, with the base64 patch decoded."""
    text = answer.decode()
    patch = orjson.loads(answer).get("response", {}).get("patch")
    return text + (base64.b64decode(patch).decode() if patch else "")


def test_secret_looking_values_appear_in_no_answer_and_no_log(server: RunningServer) -> None:
    uids: list[str] = []
    outcomes: dict[str, tuple[bool, int | None]] = {}
    with server.client() as client:
        for name, path, obj, kwargs in CASES:
            body = review(copy.deepcopy(obj), **kwargs)
            uids.append(body["request"]["uid"])
            answer = client.post(path, content=orjson.dumps(body))
            assert answer.status_code == 200
            response = answer.json()["response"]
            outcomes[name] = (response["allowed"], response.get("status", {}).get("code"))
            for secret in SECRETS:
                assert secret not in visible(answer.content), (name, secret)
        # Malformed requests that still carry the pod: a bad operation, and a body cut short.
        broken = review(pod(), namespace="shop")
        broken["request"]["operation"] = "EXPLODE"
        uids.append(broken["request"]["uid"])
        cut = orjson.dumps(review(pod(), namespace="shop"))
        for content in (orjson.dumps(broken), cut[: cut.index(PASSWORD.encode()) + 12]):
            answer = client.post("/mutate", content=content)
            assert answer.status_code in (200, 400)
            assert not any(secret in answer.text for secret in SECRETS)
    # Every path above was taken (a test of nothing would pass too).
    assert outcomes == {
        "mutate: injected": (True, None), "mutate: invalid override": (False, 400),
        "mutate: name conflict": (False, 400), "mutate: over a limit": (False, 400), "mutate: skipped": (True, None),
        "validate: allowed": (True, None), "validate: denied": (False, 403),
        "validate: warned, un-meshed": (True, None), "validate: update": (True, None),
        "validate: over a limit": (False, 400),
    }
    for uid in uids:
        server.admission_log(uid)  # waits until the batched admission lines are written
    log = server.logs()
    assert '"msg":"pod admitted without the meshguard sidecar"' in log  # lines about these pods were written
    for secret in SECRETS:
        assert secret not in log, secret

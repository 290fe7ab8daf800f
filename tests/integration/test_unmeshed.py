"""Nothing silently un-meshed: ``/validate`` counts and logs every Pod it admits in the mesh without the sidecar
(the injector was down with failurePolicy Ignore, or skipped it), over real HTTPS against a real server."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonpatch
import orjson
import pytest

from tests.conftest import RunningServer, as_injected, review
from tests.integration.test_validate import MESH, deny_all, namespace, serve_state
from tests.unit.test_unmeshed import pod
from webhook.injection.decision import STATUS_ANNOTATION

REPLICASET_CONTROLLER = "system:serviceaccount:kube-system:replicaset-controller"
STATE = [namespace("shop", **MESH), namespace("quiet", **MESH, **{"meshguard.io/policy": "audit"}),
         namespace("plain"), deny_all("shop"), deny_all("quiet"), deny_all("plain")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from serve_state(tmp_path_factory, "unmeshed", STATE)


def post(server: RunningServer, path: str, obj: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    with server.client() as client:
        answer = client.post(path, json=review(obj, namespace=obj["metadata"]["namespace"], **kwargs))
    assert answer.status_code == 200
    return answer.json()["response"]


def unmeshed(server: RunningServer) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{server.health_url}/metrics").text
    pattern = r'meshguard_unmeshed_pods_admitted_total\{namespace="([^"]*)",reason="([^"]*)"\} (\S+)'
    return {(ns, reason): float(value) for ns, reason, value in re.findall(pattern, text)}


def test_pods_admitted_without_the_sidecar_are_counted_and_logged(server: RunningServer) -> None:
    admitted = [
        pod("web-1-a"),  # a ReplicaSet's pod while the injector was down: the mTLS rule only warns
        pod("web-1-b", annotations={STATUS_ANNOTATION: "{}"}),  # claims injection, has no proxy
        {**pod("lone", namespace="quiet"), "metadata": {"name": "lone", "namespace": "quiet"}},  # audit namespace
    ]
    for obj in admitted:  # sent by the ReplicaSet controller, whose pods' failures are only warned on
        assert post(server, "/validate", obj, user=REPLICASET_CONTROLLER)["allowed"] is True
    not_counted = [
        as_injected(pod("web-1-c")),  # injected
        pod("web-1-d", labels={"meshguard.io/inject": "false"}),  # opted out
        pod("web-1-e", hostNetwork=True),  # never injected
        pod("other-1-a", namespace="plain"),  # not in the mesh
    ]
    for obj in not_counted:
        assert post(server, "/validate", obj, user=REPLICASET_CONTROLLER)["allowed"] is True
    assert post(server, "/validate", pod("web-1-f"), dry_run=True,  # admits nothing
                user=REPLICASET_CONTROLLER)["allowed"] is True
    bare = {**pod("bare"), "metadata": {"name": "bare", "namespace": "shop"}}
    assert post(server, "/validate", bare)["allowed"] is False  # denied by the mTLS rule: not admitted

    assert unmeshed(server) == {("shop", "not-injected"): 1.0, ("shop", "status-without-proxy"): 1.0,
                                ("quiet", "not-injected"): 1.0}
    lines = [orjson.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    warnings = [(e["namespace"], e["object"], e["reason"]) for e in lines
                if e["msg"] == "pod admitted without the meshguard sidecar" and e["level"] == "warning"]
    assert warnings == [("shop", "web-1-a", "not-injected"), ("shop", "web-1-b", "status-without-proxy"),
                        ("quiet", "lone", "not-injected")]


def test_a_pod_the_injector_patched_is_not_counted(server: RunningServer) -> None:
    before = unmeshed(server)
    original = pod("web-2-a")
    patch = orjson.loads(base64.b64decode(post(server, "/mutate", original)["patch"]))
    injected = jsonpatch.apply_patch(original, patch)
    assert post(server, "/validate", injected)["allowed"] is True
    assert unmeshed(server) == before

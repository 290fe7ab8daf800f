"""Limits over real HTTPS: JSON nesting depth, containers/labels/annotations per pod, the size of a request head."""

from __future__ import annotations

import base64
import socket
import ssl
from typing import Any

import httpx
import jsonpatch
import orjson
import pytest

from tests.conftest import RunningServer, review
from webhook.config import LimitSettings

LIMITS = LimitSettings()
PLACEHOLDER = "__nested__"


def nested_body(obj: dict[str, Any], depth: int, **kwargs: Any) -> bytes:
    """A review whose ``PLACEHOLDER`` string becomes ``depth`` nested objects (orjson writes at most 254 levels)."""
    deep = b'{"a":' * depth + b'"x"' + b"}" * depth
    return orjson.dumps(review(obj, **kwargs)).replace(f'"{PLACEHOLDER}"'.encode(), deep)


def pod(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app", "image": "shop/web:1"}], **spec}}


def deployment(template_spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": template_spec}}}


def post(server: RunningServer, path: str, body: bytes) -> httpx.Response:
    with server.client() as client:
        return client.post(path, content=body)


def test_json_nested_deeper_than_1024_levels_is_a_400(server: RunningServer) -> None:
    for path in ("/mutate", "/validate"):
        response = post(server, path, nested_body(pod(extra=PLACEHOLDER), 1030))
        assert response.status_code == 400
        assert response.json()["error"].startswith("request body is not valid JSON: depth limit exceeded")


@pytest.mark.parametrize("depth", [200, 1015])
def test_deep_but_valid_json_is_evaluated_on_both_webhooks(server: RunningServer, depth: int) -> None:
    obj = pod(extra=PLACEHOLDER)
    mutated = post(server, "/mutate", nested_body(obj, depth, namespace="shop"))
    assert mutated.status_code == 200
    answer = mutated.json()["response"]
    assert answer["allowed"] is True
    ops = orjson.loads(base64.b64decode(answer["patch"]))
    assert all(not op["path"].startswith("/spec/extra") for op in ops)
    jsonpatch.apply_patch(pod(), ops)  # the same patch applies to the pod without the deep field
    validated = post(server, "/validate", nested_body(obj, depth, namespace="shop"))
    assert validated.status_code == 200 and validated.json()["response"]["allowed"] is False  # the rules ran
    # An update compares old and new pod templates (the deep field first): a deep one is evaluated too, not
    # answered by the failure mode.
    def template(account: str) -> dict[str, Any]:
        return {"containers": [{"name": "app", "image": "i", "extra": PLACEHOLDER}], "serviceAccountName": account}

    update = nested_body(deployment(template("new")), depth, namespace="shop", operation="UPDATE",
                         old=deployment(template("old")))
    response = post(server, "/validate", update).json()["response"]
    assert response["allowed"] is False
    assert response["status"]["message"].startswith("Deployment shop/web: no NetworkPolicy selects pods")


def containers(count: int) -> list[dict[str, str]]:
    return [{"name": f"c{i}", "image": "i"} for i in range(count)]


OVER = [
    ("containers", pod(containers=containers(LIMITS.max_containers - 1), initContainers=containers(2)),
     LIMITS.max_containers + 1, "max_containers"),
    ("labels", {**pod(), "metadata": {"name": "web", "labels": {f"k{i}": "v" for i in range(LIMITS.max_labels + 1)}}},
     LIMITS.max_labels + 1, "max_labels"),
    ("annotations", {**pod(), "metadata": {"name": "web", "annotations": {
        f"example.com/k{i}": "v" for i in range(LIMITS.max_annotations + 5)}}}, LIMITS.max_annotations + 5,
     "max_annotations"),
]


@pytest.mark.parametrize(("what", "obj", "count", "key"), OVER, ids=[o[0] for o in OVER])
@pytest.mark.parametrize("path", ["/mutate", "/validate"])
def test_a_pod_over_a_limit_is_denied_with_the_limit_named(server: RunningServer, path: str, what: str,
                                                          obj: dict[str, Any], count: int, key: str) -> None:
    response = post(server, path, orjson.dumps(review(obj, namespace="shop"))).json()["response"]
    assert response["allowed"] is False and "patch" not in response
    assert response["status"] == {
        "code": 400,
        "message": f"meshguard refuses Pod shop/web: its pods have {count} {what}, more than the limit of "
                   f"{getattr(LIMITS, key)} (limits.{key}); no real pod needs that many, so check what generated it"}


def test_limits_apply_to_pod_templates_and_are_configurable(server_factory: Any) -> None:
    server = server_factory(config={"limits": {"max_containers": 3}})
    ok = deployment({"containers": containers(2), "initContainers": containers(1)})
    assert post(server, "/validate", orjson.dumps(review(ok, namespace="shop"))).json()["response"]["status"][
        "message"].startswith("Deployment shop/web: no NetworkPolicy")  # evaluated: within the limit
    over = deployment({"containers": containers(2), "ephemeralContainers": containers(2)})
    response = post(server, "/validate", orjson.dumps(review(over, namespace="shop"))).json()["response"]
    assert response["status"]["message"].startswith("meshguard refuses Deployment shop/web: its pods have 4 "
                                                    "containers, more than the limit of 3 (limits.max_containers)")


def test_at_the_limit_is_still_injected(server: RunningServer) -> None:
    obj = pod(containers=containers(LIMITS.max_containers - 2))
    answer = post(server, "/mutate", orjson.dumps(review(obj, namespace="shop"))).json()["response"]
    result = jsonpatch.apply_patch(obj, orjson.loads(base64.b64decode(answer["patch"])))
    assert len(result["spec"]["containers"]) + len(result["spec"]["initContainers"]) == LIMITS.max_containers


def raw_exchange(server: RunningServer, data: bytes) -> bytes:
    """Send ``data`` on a fresh TLS connection and read until the server closes it."""
    host, port = server.url.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=server.ca)
    with socket.create_connection((host, int(port)), timeout=20) as sock, \
            ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        tls.sendall(data)
        received = b""
        while chunk := tls.recv(65536):
            received += chunk
    return received


def test_an_oversized_request_head_gets_431_and_the_connection_is_closed(server: RunningServer) -> None:
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
    answer = raw_exchange(server, b"POST /mutate HTTP/1.1\r\nHost: meshguard\r\n" + headers + b"\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"connection: close" in head
    assert orjson.loads(body) == {"error": "request line and headers exceed 65536 bytes", "code": 431}


def test_a_head_under_the_cap_is_served(server: RunningServer) -> None:
    body = orjson.dumps(review(pod(), namespace="kube-system"))
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(50))
    answer = raw_exchange(server, b"POST /mutate HTTP/1.1\r\nHost: meshguard\r\nConnection: close\r\n" + headers
                          + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")

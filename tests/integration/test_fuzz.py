"""Hostile input over real HTTPS: whatever arrives, the answer is a well-formed review or a clear 4xx, never 5xx,
and every patch applies cleanly and only adds meshguard's parts.

Two levels: structurally valid AdmissionReviews carrying random Pods and controllers (random labels, annotation
keys with ``/`` and ``~``, unicode, nulls and wrong types where objects belong, long lists, deep nesting), and
raw bytes (random, and valid bodies with bytes flipped or cut). The tallies are printed at the end of the module
(``pytest -s``) as the figures the README quotes.
"""

from __future__ import annotations

import base64
import copy
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import jsonpatch
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer, review, start_server
from tests.fixtures.injection.podcheck import uninjected
from webhook.workloads import TEMPLATE_PATHS

TALLY: Counter[str] = Counter()

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
keys = st.one_of(text, st.text("abc./~-_", min_size=1, max_size=10), st.sampled_from(
    ["meshguard.io/inject", "meshguard.io/native-sidecar", "meshguard.io/proxy-cpu", "meshguard.io/status",
     "app", "kubectl.kubernetes.io/default-container"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False), text)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                    max_leaves=12)
string_maps = st.one_of(st.none(), st.dictionaries(keys, st.one_of(text, st.sampled_from(
    ["true", "false", "enabled", "100m", "2Gi", "-1", "1e9", "15001,abc"])), max_size=5), st.none(), junk)
container_names = st.one_of(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
                            st.sampled_from(["meshguard-proxy", "meshguard-init", "meshguard-bootstrap"]), text)


@st.composite
def containers(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 20)) == 0:
        return draw(junk)
    c: dict[str, Any] = {"name": draw(container_names), "image": draw(text)}
    if draw(st.booleans()):
        c["ports"] = draw(st.lists(st.fixed_dictionaries({"containerPort": st.integers(-5, 70000)}), max_size=3))
    if draw(st.booleans()):
        c["env"] = draw(st.lists(st.fixed_dictionaries({"name": text, "value": text}), max_size=30))
    if draw(st.booleans()):
        c[draw(text)] = draw(junk)
    return c


@st.composite
def pod_templates(draw: st.DrawFn) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key in ("labels", "annotations"):
        if draw(st.booleans()):
            meta[key] = draw(string_maps)
    if draw(st.booleans()):
        meta["generateName"] = "web-"
    else:
        meta["name"] = draw(text)
    spec: dict[str, Any] = {"containers": draw(st.one_of(st.lists(containers(), max_size=6), junk))}
    for key in ("initContainers", "volumes"):
        if draw(st.booleans()):
            spec[key] = draw(st.one_of(st.none(), st.lists(containers(), max_size=3), junk))
    if draw(st.booleans()):
        spec["hostNetwork"] = draw(st.one_of(st.booleans(), junk))
    if draw(st.booleans()):
        spec[draw(text)] = draw(junk)
    junk_meta = draw(st.integers(0, 10)) == 0
    template: dict[str, Any] = {"metadata": draw(junk) if junk_meta else meta, "spec": spec}
    if draw(st.integers(0, 10)) == 0:
        del template[draw(st.sampled_from(["metadata", "spec"]))]
    return template


@st.composite
def workloads(draw: st.DrawFn) -> dict[str, Any]:
    # Half are Pods, the only kind /mutate patches; the rest cover every controller and kinds neither handles.
    kind = "Pod" if draw(st.booleans()) else draw(st.sampled_from([*TEMPLATE_PATHS, "Service", "ConfigMap"]))
    template = draw(pod_templates())
    obj: dict[str, Any] = {"kind": kind, "apiVersion": "v1" if kind == "Pod" else "apps/v1"}
    if kind == "Pod":
        obj.update(template)
        return obj
    obj["metadata"] = {"name": "w", "labels": draw(string_maps)}
    node: dict[str, Any] = obj
    path = TEMPLATE_PATHS.get(kind, ("spec", "template"))
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = template if draw(st.integers(0, 15)) else draw(junk)
    return obj


@st.composite
def reviews(draw: st.DrawFn) -> dict[str, Any]:
    obj = draw(workloads())
    operation = draw(st.sampled_from(["CREATE"] * 6 + ["UPDATE", "DELETE", "CONNECT"]))
    namespace = draw(st.sampled_from(["shop", "default", "kube-system", "meshguard", ""]))
    body = review(obj, operation=operation, namespace=namespace, dry_run=draw(st.booleans()),
                  old=copy.deepcopy(obj) if operation == "UPDATE" else None)
    if draw(st.integers(0, 10)) == 0:  # a request field of the wrong type
        body["request"][draw(st.sampled_from(["kind", "namespace", "object", "operation", "dryRun"]))] = draw(junk)
    return body


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    srv = start_server(tmp_path_factory.mktemp("fuzz"), {"log_level": "warning"})
    yield srv
    srv.stop()
    print(f"\nfuzz tally: {dict(TALLY)}")
    assert srv.process.returncode in (0, -15), srv.logs()[-2000:]


@pytest.fixture(scope="module")
def client(fuzz_server: RunningServer) -> Iterator[httpx.Client]:
    with fuzz_server.client() as c:
        yield c


def _check_answer(r: httpx.Response, body: dict[str, Any]) -> dict[str, Any]:
    TALLY[f"http {r.status_code}"] += 1
    assert r.status_code < 500, r.text
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == body["request"]["uid"]
    assert isinstance(response["allowed"], bool)
    if not response["allowed"]:
        assert response["status"]["message"].strip()
        assert "Traceback" not in response["status"]["message"]
    for warning in response.get("warnings", []):
        assert isinstance(warning, str) and len(warning) <= 120
    return response


@given(body=reviews())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_mutate_answers_every_review_and_patches_cleanly(client: httpx.Client, body: dict[str, Any]) -> None:
    response = _check_answer(client.post("/mutate", content=orjson.dumps(body)), body)
    TALLY["mutate " + ("patched" if "patch" in response else "allowed" if response["allowed"] else "denied")] += 1
    if "patch" in response:
        assert response["patchType"] == "JSONPatch"
        obj = body["request"]["object"]
        try:
            result = jsonpatch.apply_patch(obj, orjson.loads(base64.b64decode(response["patch"])))
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            TALLY["invalid patch"] += 1
            raise AssertionError(f"patch does not apply: {exc}") from exc
        assert uninjected(result, obj) == obj


@given(body=reviews())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_validate_answers_every_review(client: httpx.Client, body: dict[str, Any]) -> None:
    response = _check_answer(client.post("/validate", content=orjson.dumps(body)), body)
    assert "patch" not in response
    TALLY["validate " + ("allowed" if response["allowed"] else "denied")] += 1


VALID = orjson.dumps(review({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                             "spec": {"containers": [{"name": "a", "image": "b"}]}}, namespace="shop"))


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return draw(st.binary(max_size=2048))
    data = bytearray(VALID)
    if choice == 1:
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return bytes(data[: draw(st.integers(0, len(data)))])


@pytest.mark.parametrize("path", ["/mutate", "/validate"])
@given(body=damaged())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
def test_raw_bytes_get_a_clear_answer(client: httpx.Client, path: str, body: bytes) -> None:
    r = client.post(path, content=body)
    TALLY[f"bytes http {r.status_code}"] += 1
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["code"] == 400 and r.json()["error"]
    else:
        assert isinstance(r.json()["response"]["allowed"], bool)

"""The admission server over real HTTPS: round trip, the shape of every answer, and every kind of bad input."""

from __future__ import annotations

import socket
import ssl

import httpx
import orjson
import pytest

from tests.conftest import RunningServer, review

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
       "spec": {"containers": [{"name": "app", "image": "nginx"}]}}
UID = "705ab4f5-6393-11e8-b7cc-42010a800002"


def test_round_trip_echoes_uid_and_shape(server: RunningServer) -> None:
    # kube-system is never injected nor checked, so both webhooks answer a plain allow here.
    body = review(POD, namespace="kube-system", uid=UID)
    with server.client() as client:
        for path in ("/mutate", "/validate"):
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "application/json"
            data = r.json()
            assert data["apiVersion"] == "admission.k8s.io/v1"
            assert data["kind"] == "AdmissionReview"
            assert data["response"]["uid"] == UID
            assert data["response"]["allowed"] is True
            assert "patch" not in data["response"]


def test_curl_style_form_content_type_is_accepted(server: RunningServer) -> None:
    with server.client() as client:
        r = client.post("/validate", content=orjson.dumps(review(POD, namespace="kube-system", uid=UID)),
                        headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200
    assert r.json()["response"]["uid"] == UID


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'"AdmissionReview"', "must be a JSON object"),
        (b'{"kind": "Pod", "apiVersion": "v1"}', 'expected kind AdmissionReview, got "Pod"'),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1", "request": {"uid": "a"}}',
         "expected apiVersion admission.k8s.io/v1"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}', "no request object"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": []}', "no request object"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {}}', "no uid"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {"uid": 7}}', "no uid"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
    ],
    ids=["empty", "truncated", "binary", "array", "string", "wrong-kind", "v1beta1", "no-request",
         "request-array", "no-uid", "uid-number", "deep-nesting"],
)
def test_not_an_admission_review_is_400(server: RunningServer, body: bytes, fragment: str) -> None:
    with server.client() as client:
        for path in ("/mutate", "/validate"):
            r = client.post(path, content=body)
            assert r.status_code == 400, r.text
            assert fragment in r.json()["error"]
            assert r.json()["code"] == 400


@pytest.mark.parametrize(
    ("request_patch", "fragment"),
    [
        ({"operation": "PATCH"}, "request.operation must be one of"),
        ({"kind": "Pod"}, "request.kind must be a JSON object"),
        ({"kind": {"group": ""}}, "request.kind.kind must be a non-empty string"),
        ({"object": ["not", "an", "object"]}, "request.object must be a JSON object"),
        ({"namespace": 42}, "request.namespace must be a non-empty string"),
    ],
)
def test_malformed_request_fields_answer_with_uid_and_failure_mode(
    server: RunningServer, request_patch: dict, fragment: str
) -> None:
    body = review(POD, uid=UID)
    body["request"].update(request_patch)
    with server.client() as client:
        mutate = client.post("/mutate", json=body).json()["response"]
        validate = client.post("/validate", json=body).json()["response"]
    # Defaults: injection fails closed (never silently un-meshed), validation fails open (never blocks by bug).
    assert mutate["uid"] == UID and mutate["allowed"] is False
    assert mutate["status"]["code"] == 400 and fragment in mutate["status"]["message"]
    assert validate["uid"] == UID and validate["allowed"] is True
    assert fragment in validate["status"]["message"]
    assert validate["warnings"] and all(len(w) <= 120 for w in validate["warnings"])


def test_unicode_everywhere_is_answered(server: RunningServer) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "wëb-ü", "labels": {"app": "ünïcødé-☃"}, "annotations": {"note/~x": "日本語 \u0000"}},
           "spec": {"containers": [{"name": "app", "image": "nginx"}]}}
    with server.client() as client:
        r = client.post("/validate", content=orjson.dumps(review(pod, namespace="kube-system", uid="ü-1")))
    assert r.status_code == 200
    assert r.json()["response"]["uid"] == "ü-1"


def test_body_over_the_limit_is_413_before_reading_it(server_factory) -> None:
    srv = server_factory(config={"server": {"max_body_bytes": 4096}})
    big = orjson.dumps(review({**POD, "metadata": {"name": "x" * 8000}}, uid=UID))
    with srv.client() as client:
        r = client.post("/validate", content=big)
        assert r.status_code == 413
        assert "4096 byte limit" in r.json()["error"]

        # Without a Content-Length (chunked), the cap is enforced while reading.
        def chunks():
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        r = client.post("/validate", content=chunks())
        assert r.status_code == 413
        # The server still answers normally afterwards.
        small = review(POD, namespace="kube-system", uid=UID)
        assert client.post("/validate", json=small).json()["response"]["allowed"] is True


def test_wrong_method_and_path(server: RunningServer) -> None:
    with server.client() as client:
        r = client.get("/validate")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        r = client.post("/nope", json={})
        assert r.status_code == 404 and "/nope" in r.json()["error"]


def _handshake(server: RunningServer, maximum: ssl.TLSVersion) -> str:
    host, port = server.url.removeprefix("https://").split(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(server.ca)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer old versions, so the server is what refuses
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = maximum
    with socket.create_connection((host, int(port)), timeout=5) as sock, \
            ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        return tls.version() or ""


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_below_1_2_is_refused(server: RunningServer) -> None:
    assert _handshake(server, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert _handshake(server, ssl.TLSVersion.MAXIMUM_SUPPORTED) == "TLSv1.3"
    with pytest.raises(ssl.SSLError) as refused:
        _handshake(server, ssl.TLSVersion.TLSv1_1)
    # The client did offer TLS 1.1 (it did not fail locally for lack of a protocol): the server refused it.
    assert refused.value.reason != "NO_PROTOCOLS_AVAILABLE"


def test_plain_http_on_the_tls_port_does_not_get_an_answer(server: RunningServer) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.post(server.url.replace("https", "http") + "/validate", json={}, timeout=5)


def test_health_ready_and_metrics(server: RunningServer) -> None:
    assert httpx.get(f"{server.health_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.health_url}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    with server.client() as client:
        client.post("/validate", json=review(POD, namespace="kube-system"))
        client.post("/validate", content=b"nope")
    metrics = httpx.get(f"{server.health_url}/metrics").text
    labels = 'decision="allowed",kind="Pod",operation="CREATE",webhook="validate"'
    assert f"meshguard_admission_requests_total{{{labels}}}" in metrics
    assert 'meshguard_admission_bad_requests_total{status="400",webhook="validate"}' in metrics
    assert "meshguard_serving_certificate_expiry_timestamp_seconds" in metrics


def test_one_json_log_line_per_admission(server_factory) -> None:
    srv = server_factory()
    with srv.client() as client:
        client.post("/validate", json=review(POD, namespace="kube-system", uid="log-me"))
    entry = srv.admission_log("log-me")
    assert entry["kind"] == "Pod" and entry["namespace"] == "kube-system" and entry["operation"] == "CREATE"
    assert entry["decision"] == "allowed" and isinstance(entry["duration_ms"], float)


def test_answers_with_a_message_are_logged_too(server_factory) -> None:
    srv = server_factory()
    body = review(POD, uid="bad-op")
    body["request"]["operation"] = "PATCH"
    with srv.client() as client:
        assert client.post("/mutate", json=body).json()["response"]["allowed"] is False
    entry = srv.admission_log("bad-op")
    assert entry["decision"] == "error" and "request.operation" in entry["status_message"]
    assert not any(e.get("msg") == "recording an admission failed" for e in srv.log_entries())


def test_each_response_leaves_in_one_write(server: RunningServer) -> None:
    """The head and body of an answer are one TLS write: read back as a single record carrying both."""
    body = orjson.dumps(review({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                                "spec": {"containers": [{"name": "a", "image": "b"}]}}, namespace="kube-system"))
    host, port = server.url.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=server.ca)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        for _ in range(3):  # keep-alive: every response on the connection, not just the first
            tls.sendall(b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            first = tls.recv(65536)  # one TLS record holds one write
            assert first.startswith(b"HTTP/1.1 200 ")
            head, _, rest = first.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            assert len(rest) == length, "the body did not arrive with the head"


def test_expect_100_continue_is_answered_before_the_body(server: RunningServer) -> None:
    """``100 Continue`` goes out at once, not held back with the response head, or the client never sends."""
    body = orjson.dumps(review(POD, namespace="kube-system"))
    host, port = server.url.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=server.ca)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"POST /validate HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body))
        assert tls.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        tls.sendall(body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = tls.recv(65536)
            assert chunk, f"connection closed after {answer!r}"
            answer += chunk
        uid = orjson.loads(body)["request"]["uid"]
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["response"]["uid"] == uid

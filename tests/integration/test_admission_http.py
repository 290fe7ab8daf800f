"""The admission server over real HTTPS: round trip and the shape of every answer."""

from __future__ import annotations

import base64

import orjson

from tests.conftest import RunningServer, review

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
       "spec": {"containers": [{"name": "app", "image": "nginx"}]}}


def test_round_trip_echoes_uid_and_shape(server: RunningServer) -> None:
    body = review(POD, namespace="kube-system", uid="705ab4f5-6393-11e8-b7cc-42010a800002")
    with server.client() as client:
        for path in ("/mutate", "/validate"):
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "application/json"
            data = r.json()
            assert data["apiVersion"] == "admission.k8s.io/v1"
            assert data["kind"] == "AdmissionReview"
            assert data["response"]["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
            assert data["response"]["allowed"] is True
            if "patch" in data["response"]:
                assert data["response"]["patchType"] == "JSONPatch"
                assert isinstance(orjson.loads(base64.b64decode(data["response"]["patch"])), list)

"""Encoding of AdmissionReview responses exactly as the API server reads them."""

from __future__ import annotations

import base64

import orjson
import pytest

from webhook import admission


def _decode(raw: bytes) -> dict:
    data = orjson.loads(raw)
    assert data["apiVersion"] == "admission.k8s.io/v1" and data["kind"] == "AdmissionReview"
    return data["response"]


def test_allowed_has_no_status_or_patch() -> None:
    assert _decode(admission.encode_response("u1", admission.allowed())) == {"uid": "u1", "allowed": True}


def test_denied_carries_code_and_message() -> None:
    resp = _decode(admission.encode_response("u2", admission.denied("no NetworkPolicy", warnings=("w",))))
    assert resp == {"uid": "u2", "allowed": False, "warnings": ["w"],
                    "status": {"message": "no NetworkPolicy", "code": 403}}


def test_patch_is_base64_json_patch() -> None:
    ops = [{"op": "add", "path": "/metadata/annotations/meshguard.io~1status", "value": "{}"}]
    resp = _decode(admission.encode_response("u3", admission.patched(ops)))
    assert resp["patchType"] == "JSONPatch"
    assert orjson.loads(base64.b64decode(resp["patch"])) == ops


def test_empty_patch_is_a_plain_allow() -> None:
    assert _decode(admission.encode_response("u4", admission.patched([]))) == {"uid": "u4", "allowed": True}


@pytest.mark.parametrize("allow", [True, False])
def test_errored_follows_failure_mode(allow: bool) -> None:
    resp = _decode(admission.encode_response("u5", admission.errored("x" * 300, allow=allow)))
    assert resp["allowed"] is allow
    assert resp["status"]["message"] == "x" * 300
    if allow:
        assert len(resp["warnings"][0]) <= 120
    else:
        assert resp["status"]["code"] == 500


def test_parse_request_reads_controller_pod_without_name() -> None:
    request = {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
               "namespace": "shop", "object": {"metadata": {"generateName": "web-"}}, "dryRun": True}
    parsed = admission.parse_request("u", request)
    assert (parsed.kind, parsed.namespace, parsed.name, parsed.dry_run) == ("Pod", "shop", "", True)

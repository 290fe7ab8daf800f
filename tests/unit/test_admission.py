"""Encoding of AdmissionReview responses exactly as the API server reads them."""

from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)


@st.composite
def op_lists(draw: st.DrawFn) -> list[dict]:
    ops = []
    for _ in range(draw(st.integers(0, 5))):
        shape = draw(st.sampled_from(["plain", "constant", "constants", "mixed"]))
        if shape == "plain":
            value = draw(json_values)
        elif shape == "constant":
            value = admission.Constant(draw(objects))
        elif shape == "constants":
            value = [admission.Constant(o) for o in draw(st.lists(objects, min_size=1, max_size=3))]
        else:
            value = [admission.Constant(draw(objects)), draw(objects)]
        ops.append({"op": "add", "path": "/" + draw(st.text(max_size=5)).replace("~", "~0"), "value": value})
    return ops


@given(ops=op_lists())
@settings(max_examples=300)
def test_spliced_patch_encoding_decodes_to_the_same_patch(ops: list[dict]) -> None:
    encoded = admission.encode_patch(ops)
    assert orjson.loads(base64.b64decode(encoded, validate=True)) == orjson.loads(orjson.dumps(ops))
    # Padding, if any, only at the very end: the concatenation is one valid base64 string.
    assert b"=" not in encoded.rstrip(b"=")


@given(ops=op_lists().filter(bool), uid=st.text(min_size=1, max_size=8),
       warnings=st.lists(st.text(max_size=20), max_size=2), message=st.none() | st.text(max_size=20))
@settings(max_examples=200)
def test_patch_spliced_into_the_review_keeps_every_other_field(
    ops: list[dict], uid: str, warnings: list[str], message: str | None
) -> None:
    response = admission.AdmissionResponse(allowed=True, patch=ops, warnings=tuple(warnings), message=message)
    resp = _decode(admission.encode_response(uid, response))
    expected = {"uid": uid, "allowed": True, "patchType": "JSONPatch", "patch": resp["patch"]}
    if warnings:
        expected["warnings"] = warnings
    if message:
        expected["status"] = {"message": message}
    assert resp == expected
    assert orjson.loads(base64.b64decode(resp["patch"], validate=True)) == orjson.loads(orjson.dumps(ops))


def test_a_constant_is_encoded_once_and_copies_are_plain_dicts() -> None:
    import copy

    constant = admission.Constant({"name": "meshguard-proxy"})
    first = constant.base64()
    assert constant.base64() is first
    clone = copy.deepcopy({"value": [constant]})["value"][0]
    assert type(clone) is dict and clone == constant

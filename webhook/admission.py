"""AdmissionReview ``admission.k8s.io/v1`` on the wire: decode a request, build and encode a response.

Decoding happens in two steps, the way the API server's contract draws the line:

* the envelope (JSON, ``apiVersion``/``kind``, ``request``, ``request.uid``) — if it is wrong the body is not an
  AdmissionReview at all and the caller gets HTTP 400 (:class:`ReviewError`);
* the request fields — once a ``uid`` is known every problem is answered with an AdmissionResponse that echoes
  it, because the API server can only use a response that carries its ``uid``.

Objects stay plain JSON dicts end to end: a typed model would silently drop fields this code does not know
(newer Kubernetes fields, other webhooks' additions) and a patch computed from it could erase them.
"""

from __future__ import annotations

import binascii
import copy
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import MeshguardError
from .quoting import clipped, quoted

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
OPERATIONS = frozenset({"CREATE", "UPDATE", "DELETE", "CONNECT"})


class ReviewError(MeshguardError):
    """The body is not a usable AdmissionReview; answered with HTTP ``status`` and a short JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """The parts of ``AdmissionReview.request`` that handlers use; ``object`` is the raw dict."""

    uid: str
    kind: str
    group: str
    operation: str
    namespace: str
    name: str
    object: dict[str, Any] | None
    old_object: dict[str, Any] | None
    dry_run: bool
    sub_resource: str = ""  # "ephemeralcontainers" for kubectl debug
    user: str = ""  # request.userInfo.username: who sent it, as the API server authenticated them


@dataclass(frozen=True, slots=True)
class AdmissionResponse:
    """A handler's answer. Build it with :func:`allowed`, :func:`denied`, :func:`patched` or :func:`errored`.

    ``reason`` is a short stable code for logs and metric labels (``injected``, ``skip-host-network``,
    ``policy-violation``...); it never reaches the API server.
    """

    allowed: bool
    patch: list[dict[str, Any]] | None = None
    warnings: tuple[str, ...] = ()
    code: int | None = None
    message: str | None = None
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def allowed(reason: str = "allowed", warnings: tuple[str, ...] = (), message: str | None = None) -> AdmissionResponse:
    return AdmissionResponse(allowed=True, warnings=warnings, reason=reason, message=message)


def denied(message: str, reason: str = "denied", code: int = 403, warnings: tuple[str, ...] = ()) -> AdmissionResponse:
    return AdmissionResponse(allowed=False, code=code, message=message, reason=reason, warnings=warnings)


def patched(ops: list[dict[str, Any]], reason: str = "patched", warnings: tuple[str, ...] = ()) -> AdmissionResponse:
    """Allow with a JSON patch; an empty list of operations is a plain allow (the API server rejects ``[]``)."""
    return AdmissionResponse(allowed=True, patch=ops or None, warnings=warnings, reason=reason)


def errored(message: str, allow: bool, code: int = 500, reason: str = "error") -> AdmissionResponse:
    """The request could not be evaluated; ``allow`` is the configured failure mode for this webhook."""
    if allow:
        return AdmissionResponse(allowed=True, warnings=(clipped(message, 120),), message=message, reason=reason)
    return AdmissionResponse(allowed=False, code=code, message=message, reason=reason)


def parse_envelope(body: bytes) -> tuple[str, dict[str, Any]]:
    """Return ``(uid, request)`` from the raw body, or raise :class:`ReviewError` (HTTP 400)."""
    try:
        review = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ReviewError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(review, dict):
        raise ReviewError(400, "request body must be a JSON object (an AdmissionReview)")
    if review.get("kind") != KIND:
        raise ReviewError(400, f"expected kind {KIND}, got {quoted(review.get('kind'))}")
    if review.get("apiVersion") != API_VERSION:
        raise ReviewError(
            400,
            f"expected apiVersion {API_VERSION}, got {quoted(review.get('apiVersion'))}; "
            "set admissionReviewVersions: [v1] in the webhook configuration",
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise ReviewError(400, "AdmissionReview has no request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError(400, "AdmissionReview request has no uid")
    return uid, request


def parse_request(uid: str, request: dict[str, Any]) -> AdmissionRequest:
    """Read the request fields; raises ``ValueError`` with a readable message when one has the wrong shape."""
    kind = _mapping(request, "kind")
    operation = request.get("operation")
    if not isinstance(operation, str) or operation not in OPERATIONS:
        raise ValueError(f"request.operation must be one of {', '.join(sorted(OPERATIONS))}, got {quoted(operation)}")
    obj = request.get("object")
    old = request.get("oldObject")
    for name, value in (("object", obj), ("oldObject", old)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"request.{name} must be a JSON object")
    return AdmissionRequest(
        uid=uid,
        kind=_string(kind, "kind", "request.kind"),
        group=_string(kind, "group", "request.kind", required=False),
        operation=operation,
        namespace=_string(request, "namespace", "request", required=False),
        name=_string(request, "name", "request", required=False),
        object=obj,
        old_object=old,
        dry_run=request.get("dryRun") is True,
        sub_resource=_string(request, "subResource", "request", required=False),
        user=_string(_optional_mapping(request, "userInfo"), "username", "request.userInfo", required=False),
    )


def _mapping(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"request.{key} must be a JSON object")
    return value


def _optional_mapping(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"request.{key} must be a JSON object")
    return value


def _string(parent: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = parent.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ValueError(f"{where}.{key} must be a non-empty string")
    return value


class Constant(dict[str, Any]):
    """A JSON object that is the same in every response it appears in (an injected container, a volume).

    It is serialised and base64-encoded once, the first time a patch carries it, and spliced into every later
    patch as is: the injected proxy container is most of a patch's bytes (its Envoy bootstrap alone is kilobytes),
    and encoding it anew on every pod creation cost more than deciding to inject. It must not be changed after it
    is built.
    """

    __slots__ = ("_base64",)
    _base64: bytes

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        # A copy is an ordinary dict: it may be changed, and YAML and other serialisers know it.
        return copy.deepcopy(dict(self), memo)

    def base64(self) -> bytes:
        """Base64 of this object's JSON, padded with trailing spaces to a whole number of 3-byte groups."""
        try:
            return self._base64
        except AttributeError:
            data = orjson.dumps(self)
            self._base64 = binascii.b2a_base64(data + b" " * (-len(data) % 3), newline=False)
            return self._base64


def _constants(value: Any) -> list[Constant] | None:
    if isinstance(value, Constant):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    for item in value:  # a loop, not all() over a generator: this runs for every operation of every patch
        if not isinstance(item, Constant):
            return None
    return value


def encode_patch(ops: list[dict[str, Any]]) -> bytes:
    """Base64 of the JSON patch, with every :class:`Constant` value spliced in from its cached encoding.

    Base64 maps each 3-byte group on its own, so encoded pieces can be concatenated wherever every piece but the
    last is a multiple of 3 bytes long; JSON ignores whitespace between tokens, so spaces pad each piece to that.
    """
    chunks: list[bytes] = []
    pending = bytearray(b"[")

    def cut() -> None:
        pending.extend(b" " * (-len(pending) % 3))
        chunks.append(binascii.b2a_base64(pending, newline=False))
        pending.clear()

    for index, op in enumerate(ops):
        if index:
            pending += b","
        value = op.get("value")
        constants = _constants(value)
        if constants is None:
            pending += orjson.dumps(op)
            continue
        pending += orjson.dumps({k: v for k, v in op.items() if k != "value"})[:-1] + b',"value":'
        is_list = isinstance(value, list)
        if is_list:
            pending += b"["
        for position, constant in enumerate(constants):
            if position:
                pending += b","
            cut()
            chunks.append(constant.base64())
        pending += b"]}" if is_list else b"}"
    pending += b"]"
    chunks.append(binascii.b2a_base64(pending, newline=False))
    return b"".join(chunks)


def encode_response(uid: str, response: AdmissionResponse) -> bytes:
    """Serialise the AdmissionReview answer the API server expects."""
    body: dict[str, Any] = {"uid": uid, "allowed": response.allowed}
    if response.warnings:
        body["warnings"] = list(response.warnings)
    if not response.allowed or response.message:
        status: dict[str, Any] = {"message": response.message or ""}
        if not response.allowed:
            status["code"] = response.code or 403
        body["status"] = status
    review = orjson.dumps({"apiVersion": API_VERSION, "kind": KIND, "response": body})
    if not response.patch:
        return review
    # The patch goes in as bytes, before the closing braces of response and review: base64 needs no JSON escaping,
    # and its kilobytes need not pass through a str and the serialiser again (docs/benchmarks.md#speed-tricks).
    return b"".join((review[:-2], b',"patchType":"JSONPatch","patch":"', encode_patch(response.patch), b'"}}'))


def encode_error(status: int, message: str) -> bytes:
    """The JSON body of a 4xx answer to something that is not an AdmissionReview."""
    return orjson.dumps({"error": message, "code": status})

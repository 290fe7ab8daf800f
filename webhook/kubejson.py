"""Requests to the API server as plain JSON, over the Kubernetes client's authenticated transport.

The client's typed models are skipped because objects stay the API's JSON dicts; authentication, refreshed bound
tokens included, is the client's. Every failure leaves as :class:`~webhook.errors.KubeError` (409 as
:class:`~webhook.errors.Conflict`); a GET of a missing object returns None.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import Conflict, KubeError

FIELD_MANAGER = "meshguard"
TIMEOUT_SECONDS = 10


def call(client: Any, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``method path`` with ``body``; ``client`` is a ``kubernetes.client.ApiClient``."""
    separator = "&" if "?" in path else "?"
    query = f"{separator}fieldManager={FIELD_MANAGER}" if method in ("POST", "PUT", "PATCH") else ""
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    try:
        request = client.param_serialize(method, path + query, header_params=headers, body=body,
                                         auth_settings=["BearerToken"])
        response = client.call_api(*request[:4], _request_timeout=TIMEOUT_SECONDS)
        payload = response.read()
    except Exception as exc:  # the client raises its own and urllib3's errors: one type for the caller
        raise KubeError(f"{method} {path}: {exc}") from exc
    if response.status == 404 and method == "GET":
        return None
    if 200 <= response.status < 300:
        return json.loads(payload)
    try:
        message = json.loads(payload).get("message", "")
    except ValueError:
        message = payload[:200].decode(errors="replace")
    error = Conflict if response.status == 409 else KubeError
    raise error(f"{method} {path}: HTTP {response.status}: {message}")

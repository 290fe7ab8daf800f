"""Requests to the API server as plain JSON, over the Kubernetes client's authenticated transport.

The client's typed models are skipped because objects stay the API's JSON dicts; authentication, refreshed bound
tokens included, is the client's. Every failure leaves as :class:`~webhook.errors.KubeError` (409 as
:class:`~webhook.errors.Conflict`); a GET of a missing object returns None.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from kubernetes.watch.watch import iter_resp_lines

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


def watch(client: Any, path: str, timeout_seconds: int) -> Iterator[dict[str, Any]]:
    """The events of a watch request (``path`` with ``watch=1`` and its query), as the API's JSON dicts, until the
    server ends it (after ``timeoutSeconds``) or the read times out."""
    headers = {"Accept": "application/json"}
    try:
        request = client.param_serialize("GET", path, header_params=headers, auth_settings=["BearerToken"])
        response = client.call_api(*request[:4], _request_timeout=(TIMEOUT_SECONDS, timeout_seconds + 30))
    except Exception as exc:
        raise KubeError(f"GET {path}: {exc}") from exc
    try:
        if response.status != 200:
            raise KubeError(f"GET {path}: HTTP {response.status}: {response.read()[:200].decode(errors='replace')}")
        for line in iter_resp_lines(response.response):
            yield json.loads(line)
    except KubeError:
        raise
    except Exception as exc:  # a dropped connection, a read timeout, a line that is not JSON
        raise KubeError(f"watch {path}: {exc}") from exc
    finally:
        response.response.release_conn()

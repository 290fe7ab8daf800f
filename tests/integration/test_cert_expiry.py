"""A serving certificate close to expiry is flagged by a metric and a log warning; a renewed one clears the flag."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from webhook import certs


def metric(server: Any, name: str) -> float:
    for line in httpx.get(f"{server.health_url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


def test_expiring_certificate_is_flagged_until_renewed(server_factory: Any, tmp_path: Path) -> None:
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    expiring = certs.generate_serving(cert_dir, "meshguard", "meshguard", days=10, dev=True)
    server = server_factory(config={"tls": {"cert_dir": str(cert_dir), "reload_interval_seconds": 0.2}})
    assert metric(server, "meshguard_serving_certificate_expiring") == 1.0
    assert metric(server, "meshguard_serving_certificate_expiry_timestamp_seconds") == \
        expiring.cert.not_valid_after_utc.timestamp()
    lines = [orjson.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    (warning,) = [e for e in lines if e["msg"] == "serving certificate expires soon; renew it"]
    assert warning["level"] == "warning" and warning["warning_days"] == 30
    assert warning["not_after"] == expiring.cert.not_valid_after_utc.isoformat()

    certs.generate_serving(cert_dir, "meshguard", "meshguard", days=365, dev=True)
    deadline = time.monotonic() + 30  # turns a missed reload into a failure; not a timing claim
    while metric(server, "meshguard_serving_certificate_expiring") != 0.0:
        assert time.monotonic() < deadline, "the renewed certificate was not picked up"
        time.sleep(0.1)

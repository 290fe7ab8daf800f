"""The serving certificate's expiry watch: the callback on every check, the warning when it comes due and again
every WARNING_INTERVAL, never twice in a row for the same certificate."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from webhook import certs, tls
from webhook.config import TLSSettings

DAY = dt.timedelta(days=1)
NOW = dt.datetime.now(dt.UTC)


def test_expiring_boundary() -> None:
    not_after = NOW + 30 * DAY
    assert tls.expiring(not_after, 30, NOW) is False
    assert tls.expiring(not_after, 30, NOW + dt.timedelta(seconds=1)) is True
    assert tls.expiring(not_after, 0, NOW + 31 * DAY) is True  # expired
    assert tls.expiring(not_after, 0, NOW) is False


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "meshguard.tls" and r.levelno == logging.WARNING]


def test_reloader_reports_and_warns_when_due(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    certs.generate_serving(tmp_path, "meshguard", "meshguard", days=365)
    checks: list[bool] = []
    caplog.set_level(logging.INFO, logger="meshguard.tls")
    reloader = tls.CertificateReloader(TLSSettings(cert_dir=tmp_path), on_expiry_checked=checks.append)
    assert checks == [False] and warnings(caplog) == []  # checked on load: a year left

    # The watch loop checks again on every pass: time crossing into the window is seen without a reload.
    assert reloader.check_expiry(NOW + 340 * DAY) is True
    assert reloader.check_expiry(NOW + 341 * DAY) is True
    assert checks == [False, True, True]
    assert warnings(caplog) == ["serving certificate expires soon; renew it"]  # once, not on every pass
    entry = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert entry.__dict__["warning_days"] == 30 and 24 <= entry.__dict__["days_left"] <= 26

    later = tls.time.monotonic() + tls.WARNING_INTERVAL
    monkeypatch.setattr(tls.time, "monotonic", lambda: later)
    reloader.check_expiry(NOW + 400 * DAY)
    assert warnings(caplog)[1:] == ["serving certificate has expired; renew it"]  # repeated while it lasts


def test_a_renewed_certificate_clears_the_flag_and_a_new_one_warns_again(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    certs.generate_serving(tmp_path, "meshguard", "meshguard", days=10)
    checks: list[bool] = []
    caplog.set_level(logging.INFO, logger="meshguard.tls")
    reloader = tls.CertificateReloader(TLSSettings(cert_dir=tmp_path, expiry_warning_days=30),
                                       on_expiry_checked=checks.append)
    assert checks == [True] and len(warnings(caplog)) == 1
    certs.generate_serving(tmp_path, "meshguard", "meshguard", days=365)
    assert reloader.reload() is True and checks[-1] is False
    certs.generate_serving(tmp_path, "meshguard", "meshguard", days=5)
    assert reloader.reload() is True and checks[-1] is True
    assert len(warnings(caplog)) == 2  # a different certificate: warned at once


def test_an_expired_certificate_makes_the_server_unready(tmp_path: Path) -> None:
    certs.generate_serving(tmp_path, "meshguard", "meshguard", days=365)
    valid: list[bool] = []
    reloader = tls.CertificateReloader(TLSSettings(cert_dir=tmp_path), on_valid=valid.append)
    assert valid == [True]
    reloader.check_expiry(NOW + 364 * DAY)  # close to expiry: still served, and warned about
    reloader.check_expiry(NOW + 366 * DAY)  # expired: the API server would refuse every handshake
    assert valid == [True, True, False]

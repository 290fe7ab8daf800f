"""`meshguard certs generate`: SANs, key usage, validity, file modes, CA reuse, chain verification."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from webhook.cli import main


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_generate_issues_a_serving_cert_for_the_service(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "generate", "--service", "hook", "--namespace", "mesh", "--out", str(tmp_path),
                 "--days", "30"]) == 0
    assert "created CA" in capsys.readouterr().out
    ca, leaf = _load(tmp_path / "ca.crt"), _load(tmp_path / "tls.crt")
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "hook", "hook.mesh", "hook.mesh.svc", "hook.mesh.svc.cluster.local"]
    assert sans.get_values_for_type(x509.IPAddress) == []
    assert ExtendedKeyUsageOID.SERVER_AUTH in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    lifetime = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)
    for key in ("ca.key", "tls.key"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600
    # The serving certificate verifies against the CA for each of its names.
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("hook.mesh.svc"))
    chain = verifier.verify(leaf, [])
    assert chain[-1] == ca


def test_dev_adds_loopback_names(tmp_path: Path) -> None:
    assert main(["certs", "generate", "--out", str(tmp_path), "--dev"]) == 0
    sans = _load(tmp_path / "tls.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    ca = _load(tmp_path / "ca.crt")
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(loopback)
    verifier.verify(_load(tmp_path / "tls.crt"), [])


def test_existing_ca_is_reused_for_a_fresh_serving_cert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["certs", "generate", "--out", str(tmp_path)])
    ca_before, leaf_before = (tmp_path / "ca.crt").read_bytes(), _load(tmp_path / "tls.crt")
    main(["certs", "generate", "--out", str(tmp_path)])
    assert "reused CA" in capsys.readouterr().out
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    leaf_after = _load(tmp_path / "tls.crt")
    assert leaf_after.serial_number != leaf_before.serial_number
    assert leaf_after.issuer == _load(tmp_path / "ca.crt").subject


def test_keys_are_ecdsa_p256(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    main(["certs", "generate", "--out", str(tmp_path)])
    key = serialization.load_pem_private_key((tmp_path / "tls.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"


def test_bad_days_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "generate", "--out", str(tmp_path), "--days", "0"]) == 2
    assert "--days must be at least 1" in capsys.readouterr().err

"""``meshguard certs workload``: the sidecar's certificate, with the SPIFFE ID peers verify."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from webhook import certs
from webhook.cli import main


def test_workload_certificate_carries_the_spiffe_id_for_both_directions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca, _ = certs.load_or_create_ca(tmp_path / "ca")
    out = tmp_path / "web"
    assert main(["certs", "workload", "--ca-dir", str(tmp_path / "ca"), "--namespace", "shop",
                 "--service-account", "web", "--out", str(out), "--trust-domain", "example.org",
                 "--days", "2"]) == 0
    assert "spiffe://example.org/ns/shop/sa/web" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert stat.S_IMODE((out / "tls.key").stat().st_mode) == 0o600
    assert (out / "ca.crt").read_bytes() == ca.cert_pem()
    leaf = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/ns/shop/sa/web"]
    assert sans.get_values_for_type(x509.DNSName) == []
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 2
    # It verifies as a client certificate against the mesh CA (what the server-side Envoy checks).
    verifier = PolicyBuilder().store(Store([ca.cert])).build_client_verifier()
    verified = verifier.verify(leaf, [])
    assert verified.chain == [leaf, ca.cert]
    assert verified.subjects == [x509.UniformResourceIdentifier("spiffe://example.org/ns/shop/sa/web")]


def test_an_unknown_ca_is_refused_rather_than_invented(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "workload", "--ca-dir", str(tmp_path / "none"), "--namespace", "shop",
                 "--service-account", "web", "--out", str(tmp_path / "out")]) == 2
    assert "needs ca.crt and ca.key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "none").exists()


def test_a_credential_bundle_is_written_as_the_kubelet_writes_a_pod_certificate(tmp_path: Path) -> None:
    certs.load_or_create_ca(tmp_path / "ca")
    out = tmp_path / "web"
    assert main(["certs", "workload", "--ca-dir", str(tmp_path / "ca"), "--namespace", "shop",
                 "--service-account", "web", "--out", str(out), "--credential-bundle"]) == 0
    bundle = (out / "credential-bundle.pem").read_bytes()
    assert stat.S_IMODE((out / "credential-bundle.pem").stat().st_mode) == 0o600
    # The key first (PKCS#8), then the chain: the same pair as tls.key and tls.crt.
    assert bundle.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert bundle == (out / "tls.key").read_bytes() + (out / "tls.crt").read_bytes()
    (leaf,) = x509.load_pem_x509_certificates(bundle.split(b"-----END PRIVATE KEY-----\n")[1])
    assert leaf == x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())

"""The signer's decision on a PodCertificateRequest (webhook/identity/signer.py): what it issues, what it denies,
and what it leaves for later."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from webhook import certs
from webhook.identity.signer import decide

NOW = dt.datetime(2026, 12, 7, 12, 0, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(hours=24)
CA = certs.generate_ca("test mesh CA")


def _request(key: Any, namespace: str = "shop", account: str = "web", **spec: Any) -> dict[str, Any]:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    return {"metadata": {"namespace": namespace, "name": "web-1-abc"},
            "spec": {"signerName": "meshguard.io/workload", "serviceAccountName": account, "podName": "web-1",
                     "stubPKCS10Request": base64.b64encode(csr.public_bytes(serialization.Encoding.DER)).decode(),
                     **spec}}


def _time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


@pytest.mark.parametrize("key", [ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1()),
                                 rsa.generate_private_key(65537, 3072)], ids=["P256", "P384", "RSA3072"])
def test_issues_a_leaf_whose_only_identity_is_the_verified_service_account(key: Any) -> None:
    request = _request(key, maxExpirationSeconds=86400,
                       unverifiedUserAnnotations={"spiffe": "spiffe://cluster.local/ns/kube-system/sa/admin"})
    status = decide(request, CA, "cluster.local", DAY, NOW).status
    assert status is not None and status["conditions"][0]["type"] == "Issued"
    leaf = x509.load_pem_x509_certificate(status["certificateChain"].encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["spiffe://cluster.local/ns/shop/sa/web"]
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    leaf.verify_directly_issued_by(CA.cert)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    begin, end = _time(status["notBefore"]), _time(status["notAfter"])
    assert (begin, end) == (leaf.not_valid_before_utc, leaf.not_valid_after_utc) == (NOW, NOW + DAY)
    assert _time(status["beginRefreshAt"]) == NOW + DAY / 2  # half-life, well inside the window


def test_lifetime_never_exceeds_what_the_request_allows() -> None:
    status = decide(_request(ec.generate_private_key(ec.SECP256R1()), maxExpirationSeconds=3600), CA,
                    "cluster.local", DAY, NOW).status
    assert status is not None and _time(status["notAfter"]) - _time(status["notBefore"]) == dt.timedelta(hours=1)


@pytest.mark.parametrize("key", [ec.generate_private_key(ec.SECP521R1()), ed25519.Ed25519PrivateKey.generate(),
                                 rsa.generate_private_key(65537, 2048)], ids=["P521", "Ed25519", "RSA2048"])
def test_key_types_envoy_cannot_serve_are_denied_with_the_fix(key: Any) -> None:
    status = decide(_request(key), CA, "cluster.local", DAY, NOW).status
    assert status is not None
    (condition,) = status["conditions"]
    assert (condition["type"], condition["reason"]) == ("Denied", "UnsupportedKeyType")
    assert "set keyType to one of them" in condition["message"] and "certificateChain" not in status


def test_a_request_that_is_not_usable_is_denied() -> None:
    request = _request(ec.generate_private_key(ec.SECP256R1()))
    request["spec"]["stubPKCS10Request"] = "bm90IGEgY3Ny"
    assert decide(request, CA, "cluster.local", DAY, NOW).status["conditions"][0]["reason"] == "InvalidRequest"
    del request["spec"]["serviceAccountName"]
    assert decide(request, CA, "cluster.local", DAY, NOW).status["conditions"][0]["reason"] == "InvalidRequest"


def test_a_ca_expiring_before_the_certificate_is_retried_never_failed() -> None:
    short = certs.generate_ca("short-lived CA", days=1)  # valid until about now + 1 day
    verdict = decide(_request(ec.generate_private_key(ec.SECP256R1())), short, "cluster.local",
                     dt.timedelta(days=2), dt.datetime.now(dt.UTC))
    assert verdict.status is None and "rotate the CA" in verdict.retry


def test_a_v1beta1_request_of_an_older_kubelet_is_signed_from_its_public_key() -> None:
    """Kubernetes 1.35 and 1.36 (v1beta1): the kubelet sends the bare public key (its proof of possession was
    checked by the API server) instead of a CSR."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = _request(key)
    del request["spec"]["stubPKCS10Request"]
    request["spec"]["pkixPublicKey"] = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    status = decide(request, CA, "cluster.local", DAY, NOW).status
    assert status is not None and status["conditions"][0]["type"] == "Issued"
    leaf = x509.load_pem_x509_certificate(status["certificateChain"].encode())
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    request["spec"]["pkixPublicKey"] = "bm90IGEga2V5"
    assert decide(request, CA, "cluster.local", DAY, NOW).status["conditions"][0]["reason"] == "InvalidRequest"

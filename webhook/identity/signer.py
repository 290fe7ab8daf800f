"""The decision on one PodCertificateRequest: the status to write, pure (the controller does the I/O).

The identity is taken only from fields the API server verified when the kubelet created the request: its
namespace and ``spec.serviceAccountName`` (NodeRestriction lets a node ask only for a pod bound to it, with that
pod's service account). Annotations, which nobody verifies, are never read. A request meshguard will never sign
is ``Denied`` with the reason; a problem on meshguard's side (a CA that expires too soon) is not answered at all,
so the request is retried: ``Failed`` would wedge the pod for good.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..certs import Issued, spiffe_id

# Key types Envoy's TLS (BoringSSL) serves: P-256, P-384 and RSA; not P-521 nor Ed25519.
_CURVES = {"secp256r1", "secp384r1"}
_RSA_BITS = {3072, 4096}


@dataclass(frozen=True)
class Verdict:
    """``status`` to write (Issued or Denied), or None with ``retry`` saying why it is left for later."""

    status: dict[str, Any] | None
    retry: str = ""


def _time(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(kind: str, reason: str, message: str, now: dt.datetime) -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": _time(now)}


def _denied(reason: str, message: str, now: dt.datetime) -> Verdict:
    return Verdict({"conditions": [_condition("Denied", reason, message, now)]})


def _public_key(spec: dict[str, Any]) -> Any:
    """The key to certify: from the CSR (v1, and v1beta1 from 1.37), or the bare public key a v1beta1 request of
    an older kubelet carries (the API server checked its proof of possession)."""
    if spec.get("stubPKCS10Request") or not spec.get("pkixPublicKey"):
        return x509.load_der_x509_csr(base64.b64decode(spec.get("stubPKCS10Request") or "", validate=True)).public_key()
    return serialization.load_der_public_key(base64.b64decode(spec["pkixPublicKey"], validate=True))


def decide(request: dict[str, Any], ca: Issued, trust_domain: str, lifetime: dt.timedelta,
           now: dt.datetime) -> Verdict:
    spec = request.get("spec") or {}
    namespace = (request.get("metadata") or {}).get("namespace")
    account = spec.get("serviceAccountName")
    if not isinstance(namespace, str) or not isinstance(account, str) or not namespace or not account:
        return _denied("InvalidRequest", "the request names no namespace or service account", now)
    try:
        key = _public_key(spec)
    except (ValueError, binascii.Error, TypeError):
        return _denied("InvalidRequest", "spec.stubPKCS10Request is not a PKCS#10 request (nor, in v1beta1, "
                       "spec.pkixPublicKey a public key)", now)
    if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES
            or isinstance(key, rsa.RSAPublicKey) and key.key_size in _RSA_BITS):
        return _denied("UnsupportedKeyType", "meshguard signs ECDSAP256, ECDSAP384, RSA3072 and RSA4096 keys "
                       "(what Envoy serves); set keyType to one of them", now)
    most = spec.get("maxExpirationSeconds")
    if isinstance(most, int) and not isinstance(most, bool) and most > 0:
        lifetime = min(lifetime, dt.timedelta(seconds=most))
    not_before = now.replace(microsecond=0)
    not_after = not_before + lifetime
    if ca.cert.not_valid_after_utc < not_after:
        return Verdict(None, retry=f"the mesh CA expires at {_time(ca.cert.not_valid_after_utc)}, before the "
                                   f"certificate would ({_time(not_after)}); rotate the CA")
    usage_rsa = isinstance(key, rsa.RSAPublicKey)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # No subject: the SPIFFE ID is the identity, and an empty subject makes the SAN extension critical.
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
            spiffe_id(trust_domain, namespace, account))]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=usage_rsa, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    chain = leaf.public_bytes(serialization.Encoding.PEM).decode()
    return Verdict({
        "conditions": [_condition("Issued", "Issued", f"signed by meshguard for "
                                  f"{spiffe_id(trust_domain, namespace, account)}", now)],
        "certificateChain": chain,
        "notBefore": _time(not_before),
        "notAfter": _time(not_after),
        "beginRefreshAt": _time(not_before + lifetime / 2),
    })

"""One workload certificate Secret per ServiceAccount (``identity.mode: secret``): what it holds and whether it
must be issued again. Pure; :mod:`webhook.identity.controller` reads and writes the Secrets.

The Secret is owned by its ServiceAccount, so the garbage collector deletes it with the account. Its content is
judged from the certificate itself, never from labels or annotations a tenant could edit: a certificate that is
not the mesh CA's, names another identity, does not match its key, or is past half-life is issued again.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ..certs import CA_CERT, TLS_CERT, TLS_KEY, issue_workload, spiffe_id
from .authority import Authority
from .settings import account_secret_name

# Marks the Secrets meshguard keeps, so that one list finds them all; the value is never trusted.
LABEL = "meshguard.io/identity"
LABEL_VALUE = "workload"


def secret(ca: Authority, trust_domain: str, namespace: str, account: str, uid: str,
           lifetime: dt.timedelta) -> dict[str, Any]:
    """The Secret holding a fresh certificate for ``account`` (uid ``uid``) in ``namespace``, signed by the mesh
    CA, with its trust bundle."""
    issued = issue_workload(ca.signing, namespace, account, trust_domain, days=lifetime / dt.timedelta(days=1))
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": account_secret_name(account),
            "namespace": namespace,
            "labels": {LABEL: LABEL_VALUE},
            "ownerReferences": [{"apiVersion": "v1", "kind": "ServiceAccount", "name": account, "uid": uid}],
        },
        "data": {TLS_CERT: _b64(issued.cert_pem()), TLS_KEY: _b64(issued.key_pem()), CA_CERT: _b64(ca.bundle_pem())},
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def reissue_reason(current: dict[str, Any], ca: Authority, trust_domain: str, account: str, uid: str,
                   now: dt.datetime) -> str | None:
    """Why the Secret ``current`` must be issued again, or None when it is good as it is."""
    owners = (current.get("metadata") or {}).get("ownerReferences") or []
    if not any(isinstance(o, dict) and o.get("uid") == uid for o in owners):
        return "not owned by the ServiceAccount"
    data = current.get("data") or {}
    try:
        cert = x509.load_pem_x509_certificate(base64.b64decode(data.get(TLS_CERT, ""), validate=True))
        key = serialization.load_pem_private_key(base64.b64decode(data.get(TLS_KEY, ""), validate=True), None)
        bundle = base64.b64decode(data.get(CA_CERT, ""), validate=True)
    except (ValueError, TypeError, binascii.Error):
        return "no readable certificate and key"
    try:
        cert.verify_directly_issued_by(ca.signing.cert)
    except (ValueError, TypeError, InvalidSignature):
        return "not issued by the mesh CA"
    if bundle != ca.bundle_pem():
        return "its trust bundle is not the mesh CA's"
    namespace = (current.get("metadata") or {}).get("namespace", "")
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    if [str(n.value) for n in sans] != [spiffe_id(trust_domain, namespace, account)]:
        return "names another identity"
    if key.public_key() != cert.public_key():
        return "its key is not the certificate's"
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now >= start + (end - start) / 2:
        return "past half-life"
    return None

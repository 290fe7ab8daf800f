"""The mesh CA's lifecycle, pure: what its Secret holds, and the next step of a rotation with an overlap.

The Secret holds the CA that signs (``ca.crt``, ``ca.key``) and, during a rotation, one more CA that is trusted
without signing: the next one (``next.crt``, ``next.key``) until every proxy trusts it, then the previous one
(``previous.crt``) until every certificate it signed has expired. Proxies trust all of them (the trust bundle),
so at no moment does a proxy meet a peer certificate it does not trust:

1. ``renew_before`` the signing CA's expiry, a CA meshguard made gets a successor, trusted from then on;
2. ``propagation`` later (the time for every proxy to receive the new trust bundle), the successor signs;
3. a certificate lifetime later, the old CA is no longer trusted.

A platform team that keeps its own CA starts the same rotation by putting its successor in ``next.crt`` and
``next.key``. When each step is due is kept in the Secret's annotations, so every replica agrees.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass, replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..certs import CA_CERT, CA_KEY, Issued, generate_ca
from ..errors import MeshguardError

NEXT_CERT, NEXT_KEY, PREVIOUS_CERT = "next.crt", "next.key", "previous.crt"
# meshguard made this CA, so it also makes its successor (a platform's own CA is only warned about).
MANAGED = "meshguard.io/ca-managed"
NEXT_SIGNS_FROM = "meshguard.io/next-ca-signs-from"
PREVIOUS_TRUSTED_UNTIL = "meshguard.io/previous-ca-trusted-until"
COMMON_NAME = "meshguard mesh CA"


class AuthorityError(MeshguardError, ValueError):
    """The CA Secret holds something meshguard cannot use."""


@dataclass(frozen=True)
class Authority:
    signing: Issued
    managed: bool = False
    next: Issued | None = None
    next_signs_from: dt.datetime | None = None
    previous: x509.Certificate | None = None
    previous_trusted_until: dt.datetime | None = None

    @property
    def trusted(self) -> tuple[x509.Certificate, ...]:
        """The signing CA first, then the one being brought in or phased out."""
        extra = (self.next.cert,) if self.next else ()
        return (self.signing.cert, *extra, *((self.previous,) if self.previous else ()))

    def bundle_pem(self) -> bytes:
        """The trust bundle every proxy verifies its peers (and the control plane) against."""
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self.trusted)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _pair(data: dict[str, str], cert_key: str, key_key: str) -> Issued:
    cert = x509.load_pem_x509_certificate(base64.b64decode(data[cert_key]))
    key = serialization.load_pem_private_key(base64.b64decode(data[key_key]), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AuthorityError(f"{key_key} must be an EC key")
    if key.public_key() != cert.public_key():
        raise AuthorityError(f"{key_key} is not the key of {cert_key}")
    return Issued(cert, key)


def _time(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


def read(secret: dict[str, Any]) -> Authority | None:
    """The authority the Secret holds; None when it is empty (to be filled in). Raises :class:`AuthorityError`."""
    data = secret.get("data") or {}
    if CA_CERT not in data and CA_KEY not in data:
        return None
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    try:
        return Authority(
            signing=_pair(data, CA_CERT, CA_KEY),
            managed=annotations.get(MANAGED) == "true",
            next=_pair(data, NEXT_CERT, NEXT_KEY) if NEXT_CERT in data else None,
            next_signs_from=_time(annotations.get(NEXT_SIGNS_FROM)),
            previous=(x509.load_pem_x509_certificate(base64.b64decode(data[PREVIOUS_CERT]))
                      if PREVIOUS_CERT in data else None),
            previous_trusted_until=_time(annotations.get(PREVIOUS_TRUSTED_UNTIL)),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise AuthorityError(f"no usable CA: {exc}") from exc


def write(authority: Authority, secret: dict[str, Any]) -> dict[str, Any]:
    """``secret`` holding ``authority`` (its other metadata kept)."""
    data = {CA_CERT: _b64(authority.signing.cert_pem()), CA_KEY: _b64(authority.signing.key_pem())}
    if authority.next:
        data |= {NEXT_CERT: _b64(authority.next.cert_pem()), NEXT_KEY: _b64(authority.next.key_pem())}
    if authority.previous:
        data[PREVIOUS_CERT] = _b64(authority.previous.public_bytes(serialization.Encoding.PEM))
    meta = dict(secret.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if k not in (MANAGED, NEXT_SIGNS_FROM, PREVIOUS_TRUSTED_UNTIL)}
    for key, value in ((MANAGED, "true" if authority.managed else None),
                       (NEXT_SIGNS_FROM, authority.next_signs_from), (PREVIOUS_TRUSTED_UNTIL,
                                                                      authority.previous_trusted_until)):
        if value is not None:
            annotations[key] = value if isinstance(value, str) else value.isoformat()
    meta["annotations"] = annotations
    return {**secret, "metadata": meta, "data": data}


def generate(validity_days: int) -> Authority:
    return Authority(generate_ca(COMMON_NAME, days=validity_days), managed=True)


# Leaves are backdated a few minutes (clock skew): they end that much later than "now + lifetime" suggests.
_BACKDATING = dt.timedelta(minutes=10)


@dataclass(frozen=True)
class Timing:
    """When rotation steps happen (from ``identity`` settings)."""

    validity: dt.timedelta
    renew_before: dt.timedelta
    propagation: dt.timedelta
    lifetime: dt.timedelta  # of a workload certificate


def step(authority: Authority, now: dt.datetime, timing: Timing) -> tuple[Authority, str] | None:
    """The next step of the rotation that is due, and a sentence for the log; None when nothing is due."""
    if authority.previous and authority.previous_trusted_until is None:
        # A previous CA put in by hand: trusted for as long as a certificate it signed may still be in use.
        return replace(authority, previous_trusted_until=now + timing.lifetime + _BACKDATING), \
            "the previous mesh CA stays trusted for one certificate lifetime"
    if authority.previous and authority.previous_trusted_until and now >= authority.previous_trusted_until:
        return replace(authority, previous=None, previous_trusted_until=None), "the previous mesh CA is no " \
            "longer trusted: every certificate it signed has expired"
    if authority.next and authority.next_signs_from is None:
        # A successor put in by hand: trusted from now, signing once every proxy has it.
        return replace(authority, next_signs_from=now + timing.propagation), "a new mesh CA is trusted"
    if authority.next and authority.next_signs_from and now >= authority.next_signs_from and not authority.previous:
        # The certificates the old CA signed last expire one lifetime from now.
        return Authority(authority.next, managed=authority.managed, previous=authority.signing.cert,
                         previous_trusted_until=now + timing.lifetime + _BACKDATING), \
            "the new mesh CA signs from now on"
    expires = authority.signing.cert.not_valid_after_utc
    if authority.managed and not authority.next and not authority.previous and expires - now <= timing.renew_before:
        successor = generate_ca(COMMON_NAME, days=timing.validity / dt.timedelta(days=1))
        return replace(authority, next=successor, next_signs_from=now + timing.propagation), \
            "a new mesh CA is trusted, ahead of the current one's expiry"
    return None


def expiring(authority: Authority, now: dt.datetime, timing: Timing) -> bool:
    """The signing CA expires within ``renew_before`` and no successor is on its way: the platform must act."""
    return authority.next is None and authority.signing.cert.not_valid_after_utc - now <= timing.renew_before

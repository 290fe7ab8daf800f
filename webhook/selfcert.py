"""Self-managed serving certificate: the server keeps its own certificate, in a Secret, trusted by its webhooks.

Every replica runs the same loop: read the Secret, renew what is missing or due, make sure both webhook
configurations trust the CA, and copy the serving pair into ``tls.cert_dir``, where the hot reload of
:mod:`webhook.tls` picks it up. Several replicas stay safe without a leader election:

* writes are conditional on the ``resourceVersion`` that was read (a create fails when the Secret exists), so when
  two replicas renew at once one write wins and the other gets 409, reads the winner's Secret and uses it;
* the caBundle is only ever widened while a CA in it is still valid, so a replica acting on a stale read never
  removes the CA another replica's newer certificate needs;
* a new CA is trusted next to the previous one until that one expires, so replicas still serving the previous
  certificate for up to ``check_interval_seconds`` keep working.

The certificate is renewed ``renew_before_days`` before it expires and the CA when it could no longer outlive a
fresh certificate, long before anything expires. The decisions (:func:`read_secret`, :func:`plan`,
:func:`with_ca_bundle`) are pure; :class:`KubeCertificateAPI` is the only part that talks to the API server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import kubejson
from .certs import CA_CERT, CA_KEY, TLS_CERT, TLS_KEY, Issued, generate_ca, issue_serving, service_dns_names, write_pair
from .config import CertificateSettings, Settings
from .errors import Conflict, KubeError
from .state.kube import ClusterError, api_client

log = logging.getLogger("meshguard.selfcert")

CA_DAYS = 3650
# Retries of one write after 409 Conflict: each retry re-reads, so more than a couple means something is wrong.
CONFLICT_ATTEMPTS = 5
# How soon to check again while out of step (a webhook configuration not created yet, an API error).
RETRY_SECONDS = 5.0
WebhookKind = Literal["mutating", "validating"]
Action = Literal["keep", "renew", "rotate"]
# The Secret's keys, named like the files so that it can also be mounted as a tls.cert_dir.
SECRET_KEYS = (CA_CERT, CA_KEY, TLS_CERT, TLS_KEY)


class CertificateAPI(Protocol):
    """The five calls the manager makes. Objects are the API's JSON dicts; ``get_*`` return None on 404."""

    def get_secret(self) -> dict[str, Any] | None: ...
    def create_secret(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def replace_secret(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def get_webhooks(self, kind: WebhookKind) -> dict[str, Any] | None: ...
    def replace_webhooks(self, kind: WebhookKind, body: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Material:
    """What the Secret holds: the CAs to trust (the signing one first), the signing CA's key, the serving pair."""

    cas: tuple[x509.Certificate, ...]
    ca_key: ec.EllipticCurvePrivateKey
    serving: Issued

    @property
    def ca(self) -> Issued:
        return Issued(self.cas[0], self.ca_key)

    def bundle_pem(self) -> bytes:
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self.cas)

    def secret_data(self) -> dict[str, str]:
        raw = (self.bundle_pem(), self.ca.key_pem(), self.serving.cert_pem(), self.serving.key_pem())
        return {name: base64.b64encode(value).decode() for name, value in zip(SECRET_KEYS, raw, strict=True)}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ec_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("expected an ECDSA key")
    return key


def _same_public_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def read_secret(data: Mapping[str, str] | None) -> Material | None:
    """The material in a Secret's ``data``, or None when any part is missing, unreadable or inconsistent.

    None means "issue everything anew": a Secret someone emptied or corrupted heals itself on the next pass.
    """
    try:
        raw = {name: base64.b64decode((data or {})[name], validate=True) for name in SECRET_KEYS}
        cas = tuple(x509.load_pem_x509_certificates(raw[CA_CERT]))
        material = Material(cas, _ec_key(raw[CA_KEY]),
                            Issued(x509.load_pem_x509_certificate(raw[TLS_CERT]), _ec_key(raw[TLS_KEY])))
    except (KeyError, TypeError, ValueError, binascii.Error):
        return None
    if not _same_public_key(material.ca_key, cas[0]) or not _same_public_key(material.serving.key,
                                                                              material.serving.cert):
        return None
    return material


def dns_names(cert: x509.Certificate) -> frozenset[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(san.get_values_for_type(x509.DNSName))


def plan(material: Material | None, names: Iterable[str], settings: CertificateSettings,
         now: dt.datetime | None = None) -> Action:
    """What the Secret needs: ``keep``, ``renew`` the serving certificate, or ``rotate`` the CA (and renew).

    The CA is rotated while it still has a whole certificate lifetime plus the renewal margin left, so that a
    serving certificate never outlives its CA; the serving certificate is renewed ``renew_before_days`` ahead,
    or at once when its names differ from the Service's or it was not signed by the current CA.
    """
    if material is None:
        return "rotate"
    now = now or _now()
    margin = dt.timedelta(days=settings.renew_before_days)
    if material.cas[0].not_valid_after_utc - now < dt.timedelta(days=settings.validity_days) + margin:
        return "rotate"
    serving = material.serving.cert
    if (
        serving.not_valid_after_utc - now < margin
        or dns_names(serving) != frozenset(names)
        or not _issued_by(serving, material.cas[0])
    ):
        return "renew"
    return "keep"


def issue(material: Material | None, action: Action, service: str, namespace: str, settings: CertificateSettings,
          now: dt.datetime | None = None) -> Material:
    """New material for ``action`` (``renew`` or ``rotate``): CAs still valid stay trusted after the signing one."""
    now = now or _now()
    previous = material.cas if material else ()
    ca = generate_ca(days=CA_DAYS) if action == "rotate" or material is None else material.ca
    trusted = (ca.cert, *(c for c in previous if c != ca.cert and c.not_valid_after_utc > now))
    serving = issue_serving(ca, service, namespace, days=settings.validity_days)
    return Material(trusted, ca.key, serving)


def secret_body(existing: dict[str, Any] | None, material: Material, name: str, namespace: str) -> dict[str, Any]:
    """The Secret to write: the existing one (metadata, resourceVersion, type kept) with new data, or a new one."""
    if existing is not None:
        body = copy.deepcopy(existing)
        body["data"] = material.secret_data()
        return body
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/managed-by": "meshguard"}},
        "data": material.secret_data(),
    }


def _pem_certificates(b64: str | None) -> list[x509.Certificate] | None:
    try:
        return x509.load_pem_x509_certificates(base64.b64decode(b64 or "", validate=True))
    except (ValueError, binascii.Error):
        return None


def with_ca_bundle(configuration: dict[str, Any], bundle_pem: bytes,
                   now: dt.datetime | None = None) -> dict[str, Any] | None:
    """A copy of a webhook configuration whose every webhook trusts ``bundle_pem``, or None if all already do.

    A webhook is rewritten when its caBundle lacks a certificate of the bundle, holds an expired one, or is
    unreadable; a caBundle trusting more than the bundle is otherwise left alone, so that a replica acting on a
    stale Secret cannot take away the CA a newer certificate needs.
    """
    now = now or _now()
    wanted = x509.load_pem_x509_certificates(bundle_pem)
    encoded = base64.b64encode(bundle_pem).decode()
    updated = copy.deepcopy(configuration)
    changed = False
    for webhook in updated.get("webhooks") or []:
        client = webhook.setdefault("clientConfig", {})
        current = _pem_certificates(client.get("caBundle"))
        if (
            current is None
            or any(cert not in current for cert in wanted)
            or any(cert.not_valid_after_utc <= now for cert in current)
        ):
            client["caBundle"] = encoded
            changed = True
    return updated if changed else None


def write_serving(cert_dir: Path, material: Material) -> bool:
    """Copy the serving pair into ``cert_dir`` unless it is already there. Returns True when written."""
    pair = (material.serving.cert_pem(), material.serving.key_pem())
    try:
        if ((cert_dir / TLS_CERT).read_bytes(), (cert_dir / TLS_KEY).read_bytes()) == pair:
            return False
    except OSError:
        pass
    write_pair(cert_dir, material.serving, TLS_CERT, TLS_KEY)
    return True


class SelfManagedCertificates:
    """Keeps the Secret, both webhook configurations and ``cert_dir`` in step; one instance per replica."""

    def __init__(self, settings: CertificateSettings, namespace: str, cert_dir: Path, api: CertificateAPI) -> None:
        self._settings = settings
        self._namespace = namespace
        self._cert_dir = cert_dir
        self._api = api
        self._names = service_dns_names(settings.service, namespace)
        self.in_step = False

    def sync(self) -> bool:
        """One pass. Returns (and records in ``in_step``) whether everything is in step.

        The files are written once both webhook configurations trust the CA, so the API server never meets a
        certificate it does not trust yet; on a first start they are written regardless, so the server can
        start while Helm is still creating the webhook configurations. Raises :class:`KubeError`.
        """
        self.in_step = False
        material = self._ensure_secret()
        trusted = [self._ensure_trusted(kind, material.bundle_pem()) for kind in ("mutating", "validating")]
        in_step = all(trusted)
        if (in_step or not (self._cert_dir / TLS_CERT).exists()) and write_serving(self._cert_dir, material):
            log.info("serving certificate written", extra={
                "cert_dir": str(self._cert_dir), "not_after": material.serving.cert.not_valid_after_utc.isoformat()})
        self.in_step = in_step
        return in_step

    def _ensure_secret(self) -> Material:
        name = self._settings.secret_name
        for _ in range(CONFLICT_ATTEMPTS):
            existing = self._api.get_secret()
            material = read_secret(existing.get("data") if existing else None)
            action = plan(material, self._names, self._settings)
            if action == "keep" and material is not None:
                return material
            fresh = issue(material, action, self._settings.service, self._namespace, self._settings)
            body = secret_body(existing, fresh, name, self._namespace)
            try:
                if existing is None:
                    self._api.create_secret(body)
                else:
                    self._api.replace_secret(body)
            except Conflict:
                log.info("secret changed by another replica, reading it again", extra={"secret": name})
                continue
            log.info("serving certificate issued", extra={
                "secret": name, "action": action, "not_after": fresh.serving.cert.not_valid_after_utc.isoformat()})
            return fresh
        raise KubeError(f"secret {self._namespace}/{name} kept changing: gave up after {CONFLICT_ATTEMPTS} conflicts")

    def _ensure_trusted(self, kind: WebhookKind, bundle_pem: bytes) -> bool:
        name = self._settings.mutating_webhook if kind == "mutating" else self._settings.validating_webhook
        for _ in range(CONFLICT_ATTEMPTS):
            configuration = self._api.get_webhooks(kind)
            if configuration is None:
                log.warning("webhook configuration not found; will retry", extra={"kind": kind, "configuration": name})
                return False
            updated = with_ca_bundle(configuration, bundle_pem)
            if updated is None:
                return True
            try:
                self._api.replace_webhooks(kind, updated)
            except Conflict:
                continue
            log.info("caBundle updated", extra={"kind": kind, "configuration": name})
            return True
        raise KubeError(f"{kind} webhook configuration {name} kept changing: gave up after {CONFLICT_ATTEMPTS} tries")

    async def run(self) -> None:
        """Re-sync until cancelled: every ``check_interval_seconds`` when in step, every few seconds when not."""
        while True:
            await asyncio.sleep(self._settings.check_interval_seconds if self.in_step else RETRY_SECONDS)
            try:
                await asyncio.to_thread(self.sync)
            except Exception as exc:  # this loop must outlive any one failure: the certificate expires otherwise
                log.warning("self-managed certificate not in step; will retry", extra={"error": repr(exc)})


async def start(settings: Settings) -> SelfManagedCertificates:
    """The manager for this process after its first pass, so that the certificate files exist before serving.

    Raises :class:`KubeError` when the API server cannot be reached or refuses; the process should exit.
    """
    certificates = settings.certificates
    try:
        client = api_client()
    except ClusterError as exc:
        raise KubeError(str(exc)) from exc
    api = KubeCertificateAPI(client, settings.namespace, certificates)
    manager = SelfManagedCertificates(certificates, settings.namespace, settings.tls.cert_dir, api)
    await asyncio.to_thread(manager.sync)
    return manager


_PATHS: dict[WebhookKind, str] = {
    "mutating": "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/",
    "validating": "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/",
}


class KubeCertificateAPI:
    """:class:`CertificateAPI` over the kubernetes client's authenticated transport; bodies stay plain dicts.

    ``client`` is a ``kubernetes.client.ApiClient`` (see :func:`webhook.state.kube.api_client`): authentication,
    refreshed bound tokens included, is the client's; its typed models are skipped because objects stay JSON.
    """

    def __init__(self, client: Any, namespace: str, settings: CertificateSettings) -> None:
        self._client = client
        self._secrets = f"/api/v1/namespaces/{namespace}/secrets"
        self._secret = f"{self._secrets}/{settings.secret_name}"
        self._webhooks = {"mutating": settings.mutating_webhook, "validating": settings.validating_webhook}

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        return kubejson.call(self._client, method, path, body)

    def get_secret(self) -> dict[str, Any] | None:
        return self._call("GET", self._secret)

    def create_secret(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", self._secrets, body) or {}

    def replace_secret(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("PUT", self._secret, body) or {}

    def get_webhooks(self, kind: WebhookKind) -> dict[str, Any] | None:
        return self._call("GET", _PATHS[kind] + self._webhooks[kind])

    def replace_webhooks(self, kind: WebhookKind, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("PUT", _PATHS[kind] + self._webhooks[kind], body) or {}

"""The I/O of workload identity: the mesh CA kept in a Secret, its ClusterTrustBundle, and the signer that follows
PodCertificateRequests and writes each one's status once (the decision is :mod:`webhook.identity.signer`'s).

Every replica runs the signer. The status is written with the request's ``resourceVersion``, so when two
replicas answer the same request one wins and the other gets a 409 and moves on: each request is signed once.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import threading
import time
from typing import Any
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .. import kubejson
from ..certs import CA_CERT, CA_KEY, Issued, generate_ca
from ..config import Settings
from ..errors import Conflict, KubeError
from ..state.kube import api_client
from .settings import POD_CERTIFICATES_API, IdentitySettings
from .signer import decide

log = logging.getLogger("meshguard.identity")

REQUESTS = f"/apis/{POD_CERTIFICATES_API}/podcertificaterequests"
BUNDLES = f"/apis/{POD_CERTIFICATES_API}/clustertrustbundles"
WATCH_SECONDS = 60  # then a fresh list: a request left for later (a CA problem) is looked at again
BACKOFF_SECONDS = 5.0


def serves_pod_certificates(client: Any) -> bool:
    """Whether the API server serves PodCertificateRequests (``identity.mode: auto``)."""
    group = kubejson.call(client, "GET", f"/apis/{POD_CERTIFICATES_API}")
    return any(r.get("name") == "podcertificaterequests" for r in (group or {}).get("resources", []))


def load_or_create_ca(client: Any, namespace: str, settings: IdentitySettings) -> Issued:
    """The mesh CA from its Secret, which the chart creates empty: the first replica to find it empty fills it in,
    and a replica that loses that race reads the winner's. A platform team may put its own CA there instead."""
    path = f"/api/v1/namespaces/{namespace}/secrets/{settings.ca_secret}"
    for _ in range(5):
        secret = kubejson.call(client, "GET", path)
        if secret is None:
            raise KubeError(f"Secret {namespace}/{settings.ca_secret} does not exist (the chart creates it)")
        data = secret.get("data") or {}
        if CA_CERT in data and CA_KEY in data:
            try:
                cert = x509.load_pem_x509_certificate(base64.b64decode(data[CA_CERT]))
                key = serialization.load_pem_private_key(base64.b64decode(data[CA_KEY]), None)
            except ValueError as exc:
                raise KubeError(f"Secret {namespace}/{settings.ca_secret} holds no usable CA: {exc}") from exc
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise KubeError(f"Secret {namespace}/{settings.ca_secret}: {CA_KEY} must be an EC key")
            return Issued(cert, key)
        ca = generate_ca("meshguard mesh CA", days=settings.ca_validity_days)
        secret["data"] = {CA_CERT: base64.b64encode(ca.cert_pem()).decode(),
                          CA_KEY: base64.b64encode(ca.key_pem()).decode()}
        try:
            kubejson.call(client, "PUT", path, secret)
        except Conflict:
            continue
        log.info("mesh CA created", extra={"secret": settings.ca_secret,
                                           "not_after": ca.cert.not_valid_after_utc.isoformat()})
        return ca
    raise KubeError(f"Secret {namespace}/{settings.ca_secret} kept changing")


def publish_trust_bundle(client: Any, settings: IdentitySettings, ca: Issued) -> None:
    """The mesh CA as the signer's ClusterTrustBundle, which the proxies mount to verify their peers."""
    path = f"{BUNDLES}/{quote(settings.trust_bundle_name, safe='')}"
    pem = ca.cert_pem().decode()
    for _ in range(5):
        current = kubejson.call(client, "GET", path)
        if current is not None and current.get("spec", {}).get("trustBundle") == pem:
            return
        body = current or {"apiVersion": POD_CERTIFICATES_API, "kind": "ClusterTrustBundle",
                           "metadata": {"name": settings.trust_bundle_name}}
        body["spec"] = {"signerName": settings.signer_name, "trustBundle": pem}
        try:
            kubejson.call(client, "PUT" if current else "POST", path if current else BUNDLES, body)
            return
        except Conflict:
            continue
    raise KubeError(f"ClusterTrustBundle {settings.trust_bundle_name} kept changing")


class Signer:
    """Answers the PodCertificateRequests of ``settings.signer_name``: lists them, then watches, in a thread."""

    def __init__(self, client: Any, settings: IdentitySettings, trust_domain: str, ca: Issued) -> None:
        self._client = client
        self._settings = settings
        self._trust_domain = trust_domain
        self.ca = ca
        self._query = f"fieldSelector={quote('spec.signerName=' + settings.signer_name, safe='')}"

    def answer(self, request: dict[str, Any]) -> None:
        """Write the status of one request, unless it has one or is another signer's."""
        spec, meta = request.get("spec") or {}, request.get("metadata") or {}
        if spec.get("signerName") != self._settings.signer_name or (request.get("status") or {}).get("conditions"):
            return
        where = f"{meta.get('namespace')}/{meta.get('name')}"
        verdict = decide(request, self.ca, self._trust_domain, dt.timedelta(hours=self._settings.lifetime_hours),
                         dt.datetime.now(dt.UTC))
        if verdict.status is None:
            log.warning("PodCertificateRequest left for later", extra={"request": where, "reason": verdict.retry})
            return
        path = f"/apis/{POD_CERTIFICATES_API}/namespaces/{meta.get('namespace')}/podcertificaterequests/" \
               f"{meta.get('name')}/status"
        try:
            kubejson.call(self._client, "PUT", path, {**request, "status": verdict.status})
        except Conflict:
            log.debug("PodCertificateRequest answered by another replica", extra={"request": where})
            return
        outcome = verdict.status["conditions"][0]
        log.info("PodCertificateRequest answered", extra={"request": where, "condition": outcome["type"],
                                                          "reason": outcome["reason"]})

    def follow_once(self) -> None:
        """One list, then one watch from it until the server ends it."""
        listing = kubejson.call(self._client, "GET", f"{REQUESTS}?{self._query}") or {}
        for request in listing.get("items", []):
            self.answer(request)
        version = listing.get("metadata", {}).get("resourceVersion", "")
        path = (f"{REQUESTS}?{self._query}&watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}"
                f"&resourceVersion={version}")
        for event in kubejson.watch(self._client, path, WATCH_SECONDS):
            if event.get("type") in ("ADDED", "MODIFIED"):
                self.answer(event.get("object") or {})
            elif event.get("type") == "ERROR":
                return  # expired: list again

    def _follow(self) -> None:
        while True:
            try:
                self.follow_once()
            except Exception as exc:  # the signer must outlive any one failure, or pods wait for ever
                log.warning("PodCertificateRequests not followed; retrying", extra={"error": str(exc)})
                time.sleep(BACKOFF_SECONDS)

    async def run(self) -> None:
        """Follow in a daemon thread (a watch blocks, and must not hold up the process's exit) until cancelled."""
        threading.Thread(target=self._follow, name="pod-certificate-signer", daemon=True).start()
        await asyncio.Event().wait()


async def start(settings: Settings) -> Signer | None:
    """The signer for this process, with the mesh CA loaded and published; None when certificates come from
    Secrets (``identity.mode: secret``, or ``auto`` on an API server without Pod Certificates) or when there is
    no cluster (``--dev``, ``--state``). Raises :class:`KubeError` when the API server cannot be used."""
    identity = settings.identity
    if identity.mode == "secret" or settings.dev or settings.state_dir is not None:
        return None
    client = api_client()
    served = await asyncio.to_thread(serves_pod_certificates, client)
    if not served:
        if identity.mode == "pod-certificate":
            raise KubeError(f"identity.mode is pod-certificate, but the API server does not serve "
                            f"PodCertificateRequests ({POD_CERTIFICATES_API}); use mode secret or auto")
        log.info("the API server does not serve Pod Certificates: proxies use the workload certificate Secrets")
        return None
    ca = await asyncio.to_thread(load_or_create_ca, client, settings.namespace, identity)
    await asyncio.to_thread(publish_trust_bundle, client, identity, ca)
    return Signer(client, identity, settings.injection.trust_domain, ca)

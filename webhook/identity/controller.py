"""The I/O of workload identity: the mesh CA kept in a Secret, its ClusterTrustBundle, the signer that follows
PodCertificateRequests and writes each one's status once (the decision is :mod:`webhook.identity.signer`'s), and,
on clusters without Pod Certificates, the keeper of one certificate Secret per ServiceAccount of the mesh (its
decisions are :mod:`webhook.identity.accounts`').

Every replica runs them. Writes carry the object's ``resourceVersion`` (or create it), so when two replicas do
the same work one wins and the other gets a 409 and moves on: each request is signed once, each Secret renewed
once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from .. import kubejson
from ..config import Settings
from ..errors import Conflict, KubeError
from ..injection.decision import INJECT_KEY, NAMESPACE_ENABLED, POD_ENABLED
from ..metrics import Metrics
from ..state.kube import api_client
from ..workloads import service_account
from . import accounts, authority
from .settings import POD_CERTIFICATES_APIS, IdentitySettings, account_secret_name
from .signer import decide

log = logging.getLogger("meshguard.identity")

REFRESH_SECONDS = 60  # how often the mesh CA's Secret is read again (another replica's rotation step)
WATCH_SECONDS = 60  # then a fresh list: a request left for later (a CA problem) is looked at again
BACKOFF_SECONDS = 5.0
# How often every account's Secret is checked (one list of them): renewals, and repairs of edited Secrets.
SWEEP_SECONDS = 60


def _follow_once(client: Any, path: str, query: str, on_list: Callable[[list[dict[str, Any]]], None],
                 on_event: Callable[[str, dict[str, Any]], None]) -> None:
    """One list of ``path?query`` handed to ``on_list``, then one watch from it until the server ends it, each
    ADDED, MODIFIED or DELETED event handed to ``on_event``."""
    listing = kubejson.call(client, "GET", f"{path}?{query}") or {}
    on_list(listing.get("items", []))
    version = listing.get("metadata", {}).get("resourceVersion", "")
    watch = (f"{path}?{query}&watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}"
             f"&resourceVersion={version}")
    for event in kubejson.watch(client, watch, WATCH_SECONDS):
        kind = event.get("type")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            on_event(kind, event.get("object") or {})
        elif kind == "ERROR":
            return  # expired: list again


def _forever(what: str, once: Callable[[], None], stopped: threading.Event | None = None) -> None:
    """``once`` again and again in a daemon thread (blocking calls must not hold up the process's exit) until
    ``stopped``: a controller must outlive any one failure, or pods wait for ever."""
    def loop() -> None:
        while stopped is None or not stopped.is_set():
            try:
                once()
            except Exception as exc:
                log.warning("not followed; retrying", extra={"what": what, "error": str(exc)})
                time.sleep(BACKOFF_SECONDS)

    threading.Thread(target=loop, name=what, daemon=True).start()


def served_api(client: Any, resource: str) -> str | None:
    """The preferred version of :data:`POD_CERTIFICATES_APIS` that serves ``resource`` (``podcertificaterequests``,
    ``clustertrustbundles``); None when none does (``identity.mode: auto`` then keeps Secrets)."""
    for api in POD_CERTIFICATES_APIS:
        group = kubejson.call(client, "GET", f"/apis/{api}")
        if any(r.get("name") == resource for r in (group or {}).get("resources", [])):
            return api
    return None


class MeshAuthority:
    """The mesh CA as its Secret holds it: loaded at start (the chart creates the Secret empty; the first replica
    to find it empty fills it in, a replica that loses that race reads the winner's), then read again every
    :data:`REFRESH_SECONDS`, taking the rotation's next step when one is due (:mod:`webhook.identity.authority`).
    Whoever uses the CA reads :attr:`current` each time, and ``on_change`` callbacks hear of a new trust bundle.
    """

    def __init__(self, client: Any, namespace: str, settings: IdentitySettings, metrics: Metrics | None = None,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self._client = client
        self._path = f"/api/v1/namespaces/{namespace}/secrets/{settings.ca_secret}"
        self._where = f"Secret {namespace}/{settings.ca_secret}"
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._listeners: list[Callable[[authority.Authority], None]] = []
        self._warned: dt.datetime | None = None
        self.current = self._load()

    def on_change(self, callback: Callable[[authority.Authority], None]) -> None:
        self._listeners.append(callback)

    def _read(self) -> tuple[dict[str, Any], authority.Authority | None]:
        secret = kubejson.call(self._client, "GET", self._path)
        if secret is None:
            raise KubeError(f"{self._where} does not exist (the chart creates it)")
        try:
            return secret, authority.read(secret)
        except authority.AuthorityError as exc:
            raise KubeError(f"{self._where}: {exc}") from exc

    def _load(self) -> authority.Authority:
        for _ in range(5):
            secret, held = self._read()
            if held is not None:
                return self._stepped(secret, held)
            made = authority.generate(self._settings.ca_validity_days)
            try:
                kubejson.call(self._client, "PUT", self._path, authority.write(made, secret))
            except Conflict:
                continue
            log.info("mesh CA created", extra={"secret": self._settings.ca_secret,
                                               "not_after": made.signing.cert.not_valid_after_utc.isoformat()})
            return self._observed(made)
        raise KubeError(f"{self._where} kept changing")

    def _stepped(self, secret: dict[str, Any], held: authority.Authority) -> authority.Authority:
        """``held`` with every due rotation step taken and written; another replica's write wins a conflict."""
        timing = self._settings.ca_timing
        while (due := authority.step(held, self._clock(), timing)) is not None:
            held, what = due
            try:
                secret = kubejson.call(self._client, "PUT", self._path, authority.write(held, secret)) or secret
            except Conflict:
                return self._stepped(*self._read_held())
            log.info(what, extra={"secret": self._settings.ca_secret,
                                  "trusted": [c.serial_number for c in held.trusted]})
        return self._observed(held)

    def _read_held(self) -> tuple[dict[str, Any], authority.Authority]:
        secret, held = self._read()
        if held is None:
            raise KubeError(f"{self._where} was emptied")
        return secret, held

    def _observed(self, held: authority.Authority) -> authority.Authority:
        """Export the signing CA's expiry, and warn (daily) while a CA meshguard will not replace is expiring."""
        now = self._clock()
        expiring = authority.expiring(held, now, self._settings.ca_timing)
        not_after = held.signing.cert.not_valid_after_utc
        if self._metrics is not None:
            self._metrics.mesh_ca_expiry.set(not_after.timestamp())
            self._metrics.mesh_ca_expiring.set(int(expiring))
        if expiring and (self._warned is None or now - self._warned >= dt.timedelta(days=1)):
            self._warned = now
            log.warning("the mesh CA expires soon and meshguard does not replace a CA it did not make: put its "
                        f"successor in next.crt and next.key of the {self._where}",
                        extra={"not_after": not_after.isoformat()})
        return held

    def refresh(self) -> None:
        """Read the Secret again, take a due step, and tell the listeners when the trust bundle changed."""
        held = self._stepped(*self._read_held())
        before, self.current = self.current, held
        if held.bundle_pem() != before.bundle_pem() or held.signing.cert != before.signing.cert:
            for callback in self._listeners:
                callback(held)

    async def run(self) -> None:
        """:meth:`refresh` every :data:`REFRESH_SECONDS` in a thread, until cancelled."""
        def once() -> None:
            time.sleep(REFRESH_SECONDS)
            self.refresh()

        _forever("mesh CA", once)
        await asyncio.Event().wait()


def publish_trust_bundle(client: Any, settings: IdentitySettings, held: authority.Authority, api: str) -> None:
    """The mesh CA's trust bundle as the signer's ClusterTrustBundle (of ``api``), which the proxies mount to
    verify peers."""
    bundles = f"/apis/{api}/clustertrustbundles"
    path = f"{bundles}/{quote(settings.trust_bundle_name, safe='')}"
    pem = held.bundle_pem().decode()
    for _ in range(5):
        current = kubejson.call(client, "GET", path)
        if current is not None and current.get("spec", {}).get("trustBundle") == pem:
            return
        body = current or {"apiVersion": api, "kind": "ClusterTrustBundle",
                           "metadata": {"name": settings.trust_bundle_name}}
        body["spec"] = {"signerName": settings.signer_name, "trustBundle": pem}
        try:
            kubejson.call(client, "PUT" if current else "POST", path if current else bundles, body)
            return
        except Conflict:
            continue
    raise KubeError(f"ClusterTrustBundle {settings.trust_bundle_name} kept changing")


class Signer:
    """Answers the PodCertificateRequests of ``settings.signer_name``: lists them, then watches, in a thread."""

    def __init__(self, client: Any, settings: IdentitySettings, trust_domain: str, ca: MeshAuthority,
                 api: str = POD_CERTIFICATES_APIS[0]) -> None:
        self._client = client
        self._api = api
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
        verdict = decide(request, self.ca.current.signing, self._trust_domain,
                         dt.timedelta(hours=self._settings.lifetime_hours), dt.datetime.now(dt.UTC))
        if verdict.status is None:
            log.warning("PodCertificateRequest left for later", extra={"request": where, "reason": verdict.retry})
            return
        path = f"/apis/{self._api}/namespaces/{meta.get('namespace')}/podcertificaterequests/" \
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
        def on_list(requests: list[dict[str, Any]]) -> None:
            for request in requests:
                self.answer(request)

        def on_event(kind: str, request: dict[str, Any]) -> None:
            if kind != "DELETED":
                self.answer(request)

        _follow_once(self._client, f"/apis/{self._api}/podcertificaterequests", self._query, on_list, on_event)

    async def run(self) -> None:
        """Answer requests in a thread until cancelled."""
        _forever("PodCertificateRequests", self.follow_once)
        await asyncio.Event().wait()


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


@dataclass
class _Mesh:
    """What the keeper follows: namespaces labeled for the mesh, every ServiceAccount's uid, and the accounts of
    pods opted in by their own label (in namespaces that are not)."""

    namespaces: dict[str, bool] = field(default_factory=dict)
    accounts: dict[tuple[str, str], str] = field(default_factory=dict)
    opted_in: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)

    def wanted(self) -> dict[tuple[str, str], str]:
        """(namespace, account) -> uid of every account whose pods get the proxy."""
        opted = set(self.opted_in.values())
        return {key: uid for key, uid in self.accounts.items() if key[0] in self.namespaces or key in opted}


# What each followed object adds to its table of _Mesh: (key, value).
_RECORDS: dict[str, Callable[[dict[str, Any]], tuple[Any, Any]]] = {
    "namespaces": lambda ns: (_key(ns)[1], True),
    "accounts": lambda account: (_key(account), (account.get("metadata") or {}).get("uid", "")),
    "opted_in": lambda pod: (_key(pod), (_key(pod)[0], service_account(pod.get("spec") or {}))),
}
_SOURCES = {
    "namespaces": ("/api/v1/namespaces", "labelSelector=" + quote(f"{INJECT_KEY}={NAMESPACE_ENABLED}", safe="")),
    "accounts": ("/api/v1/serviceaccounts", ""),
    "opted_in": ("/api/v1/pods", "labelSelector=" + quote(f"{INJECT_KEY}={POD_ENABLED}", safe="")),
}


class AccountSecrets:
    """Keeps a workload certificate Secret for every ServiceAccount of the mesh (``identity.mode: secret``).

    The Secret ``meshguard-identity-<account>`` is created when the account, its namespace's label or an opted-in
    pod appears, renewed from half-life on, repaired when edited, and deleted with the account by the garbage
    collector (it is owned by it). The kubelet writes a renewed Secret into running pods and the proxy reads it
    from there, without a restart.
    """

    def __init__(self, client: Any, settings: IdentitySettings, trust_domain: str, ca: MeshAuthority,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 sweep_seconds: float = SWEEP_SECONDS) -> None:
        self._client = client
        self._lifetime = dt.timedelta(hours=settings.lifetime_hours)
        self._trust_domain = trust_domain
        self.ca = ca
        self._clock = clock
        self._mesh = _Mesh()
        self._lock = threading.Lock()
        self._sweep = threading.Event()
        self._sweep_seconds = sweep_seconds
        self._stopped = threading.Event()

    def ensure(self, namespace: str, account: str, uid: str, current: dict[str, Any] | None = None,
               read: bool = True) -> None:
        """Make the account's Secret right: ``current`` is what a list showed (``read`` it first if not given)."""
        path = f"/api/v1/namespaces/{namespace}/secrets"
        name = account_secret_name(account)
        if current is None and read:
            current = kubejson.call(self._client, "GET", f"{path}/{name}")
        if current is not None:
            reason = accounts.reissue_reason(current, self.ca.current, self._trust_domain, account, uid,
                                             self._clock())
            if reason is None:
                return
        wanted = accounts.secret(self.ca.current, self._trust_domain, namespace, account, uid, self._lifetime)
        try:
            if current is None:
                kubejson.call(self._client, "POST", path, wanted)
                reason = "missing"
            else:
                wanted["metadata"]["resourceVersion"] = current["metadata"].get("resourceVersion")
                kubejson.call(self._client, "PUT", f"{path}/{name}", wanted)
        except Conflict:
            if current is None and not read:
                self.ensure(namespace, account, uid)  # it exists after all, unlisted: judge what it holds
            return  # else another replica wrote it first
        log.info("workload certificate Secret issued", extra={"secret": f"{namespace}/{name}", "reason": reason})

    def sweep(self) -> None:
        """Check every wanted account's Secret against one list of them, with the mesh CA as it is now (a replica
        that has not seen another's rotation step yet would issue from the step before)."""
        try:
            self.ca.refresh()
        except KubeError as exc:
            log.warning("mesh CA not read again", extra={"error": str(exc)})
        with self._lock:
            wanted = self._mesh.wanted()
        query = "labelSelector=" + quote(f"{accounts.LABEL}={accounts.LABEL_VALUE}", safe="")
        listing = kubejson.call(self._client, "GET", f"/api/v1/secrets?{query}") or {}
        held = {_key(s): s for s in listing.get("items", [])}
        for (namespace, account), uid in wanted.items():
            self._ensure(namespace, account, uid, held.get((namespace, account_secret_name(account))), read=False)

    def _ensure(self, namespace: str, account: str, uid: str, current: dict[str, Any] | None = None,
                read: bool = True) -> None:
        """:meth:`ensure`, a failure logged: one account's Secret (a tenant's Opaque one in its place) must not
        hold up the others'."""
        try:
            self.ensure(namespace, account, uid, current, read)
        except KubeError as exc:
            log.warning("workload certificate Secret not written", extra={
                "secret": f"{namespace}/{account_secret_name(account)}", "error": str(exc)})

    def _follow(self, table: str) -> None:
        """Keep one table of what is followed; a watch event that makes an account wanted writes its Secret at
        once, a list (at start, after each watch) has the sweep check them all."""
        record = _RECORDS[table]

        def on_list(items: list[dict[str, Any]]) -> None:
            with self._lock:
                setattr(self._mesh, table, dict(record(obj) for obj in items))
            self._sweep.set()

        def on_event(kind: str, obj: dict[str, Any]) -> None:
            key, value = record(obj)
            with self._lock:
                before = self._mesh.wanted()
                rows = getattr(self._mesh, table)
                if kind == "DELETED":
                    rows.pop(key, None)
                else:
                    rows[key] = value
                new = {k: uid for k, uid in self._mesh.wanted().items() if before.get(k) != uid}
            for (namespace, account), uid in new.items():
                self._ensure(namespace, account, uid)

        _follow_once(self._client, *_SOURCES[table], on_list, on_event)

    def sweep_soon(self) -> None:
        """Check every Secret now (the trust bundle changed)."""
        self._sweep.set()

    def _sweep_once(self) -> None:
        self._sweep.wait(self._sweep_seconds)
        self._sweep.clear()
        if not self._stopped.is_set():
            self.sweep()

    def start(self) -> None:
        """Follow namespaces, accounts and opted-in pods, and sweep, each in a thread."""
        for table in _SOURCES:
            _forever(f"identity {table}", functools.partial(self._follow, table), self._stopped)
        _forever("workload certificate Secrets", self._sweep_once, self._stopped)

    def stop(self) -> None:
        """The threads end after their current watch (tests; a server ends with its process)."""
        self._stopped.set()
        self._sweep.set()

    async def run(self) -> None:
        """:meth:`start`, then wait until cancelled."""
        self.start()
        await asyncio.Event().wait()


@dataclass(frozen=True)
class Identity:
    """How this process gives proxies their identity: the mesh CA, the jobs that keep it and issue certificates,
    and what the injector must set for it."""

    ca: MeshAuthority
    jobs: tuple[Callable[[], Coroutine[Any, Any, None]], ...]
    injection: dict[str, Any]


async def start(settings: Settings, metrics: Metrics | None = None) -> Identity | None:
    """Workload identity for this process, with the mesh CA loaded (and published for Pod Certificates); None when
    the platform team provides the certificates (``identity.mode: static``) or when there is no cluster
    (``--dev``, ``--state``). Raises :class:`KubeError` when the API server cannot be used."""
    identity = settings.identity
    if identity.mode == "static" or settings.dev or settings.state_dir is not None:
        return None
    client = api_client()
    requests_api = bundles_api = None
    if identity.mode in ("auto", "pod-certificate"):
        requests_api = await asyncio.to_thread(served_api, client, "podcertificaterequests")
        bundles_api = await asyncio.to_thread(served_api, client, "clustertrustbundles")
        if identity.mode == "pod-certificate" and not (requests_api and bundles_api):
            raise KubeError(f"identity.mode is pod-certificate, but the API server does not serve "
                            f"PodCertificateRequests and ClusterTrustBundles ({' or '.join(POD_CERTIFICATES_APIS)}); "
                            "use mode secret or auto")
    ca = await asyncio.to_thread(MeshAuthority, client, settings.namespace, identity, metrics)
    trust_domain = settings.injection.trust_domain
    if requests_api and bundles_api:
        await asyncio.to_thread(publish_trust_bundle, client, identity, ca.current, bundles_api)
        ca.on_change(lambda held: _publish_quietly(client, identity, held, bundles_api))
        signer = Signer(client, identity, trust_domain, ca, requests_api)
        log.info("each pod gets a Pod Certificate from meshguard's signer", extra={"api": requests_api})
        # Each injected proxy mounts its own Pod Certificate from this signer.
        return Identity(ca, (ca.run, signer.run), {"pod_certificate_signer": identity.signer_name})
    log.info("workload certificates are kept in a Secret per ServiceAccount", extra={"mode": identity.mode})
    keeper = AccountSecrets(client, identity, trust_domain, ca)
    ca.on_change(lambda held: keeper.sweep_soon())
    return Identity(ca, (ca.run, keeper.run), {"cert_secret_per_account": True})


def _publish_quietly(client: Any, settings: IdentitySettings, held: authority.Authority, api: str) -> None:
    try:
        publish_trust_bundle(client, settings, held, api)
    except KubeError as exc:  # the next change (or restart) publishes it; until then proxies keep the old bundle
        log.warning("trust bundle not published", extra={"error": str(exc)})

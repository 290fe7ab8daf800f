"""The self-managed serving certificate: its decisions, and whole passes of several replicas against an
in-memory API server that has the real one's optimistic concurrency (a write carrying a stale ``resourceVersion``
or a create of an existing name gets 409). :class:`FakeCluster` also serves over HTTP for test_selfcert_api.py.

Every certificate a pass produces is checked the way the API server would use it: a real TLS handshake between
the server's hot-reloaded context and a client trusting only the webhook configuration's caBundle.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime as dt
import json
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.fakehttp import JSONHandler
from webhook import certs, config, selfcert
from webhook.config import CertificateSettings, TLSSettings
from webhook.selfcert import (
    Conflict,
    KubeError,
    Material,
    SelfManagedCertificates,
    WebhookKind,
    dns_names,
    issue,
    plan,
    read_secret,
    with_ca_bundle,
    write_serving,
)
from webhook.tls import CertificateReloader

NAMESPACE = "mesh-system"
SECRET = "meshguard-tls"
WEBHOOKS = "meshguard"
SECRETS_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets"
CONFIG_PATHS: dict[WebhookKind, str] = {
    "mutating": f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{WEBHOOKS}",
    "validating": f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{WEBHOOKS}",
}


def webhook_configuration(kind: WebhookKind, names: tuple[str, ...]) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": f"{kind.capitalize()}WebhookConfiguration",
        "metadata": {"name": WEBHOOKS},
        "webhooks": [
            {"name": name, "clientConfig": {"service": {"name": "meshguard", "namespace": NAMESPACE}}}
            for name in names
        ],
    }


class FakeCluster:
    """Objects by API path. ``writes`` lists every accepted write as (method, path); ``conflicts`` counts 409s."""

    def __init__(self, secret: dict[str, Any] | None = None, webhooks: bool = True) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.writes: list[tuple[str, str]] = []
        self.conflicts = 0
        self._version = 0
        self._lock = threading.Lock()
        # Called (outside the lock) after every GET: lets a test line replicas up or change an object mid-pass.
        self.after_get: Callable[[str], None] = lambda path: None
        if secret is not None:
            self.put(f"{SECRETS_PATH}/{SECRET}", secret)
        if webhooks:
            self.put(CONFIG_PATHS["mutating"], webhook_configuration("mutating", ("a.inject.meshguard.io",
                                                                                 "b.inject.meshguard.io")))
            self.put(CONFIG_PATHS["validating"], webhook_configuration("validating", ("policy.meshguard.io",)))

    def put(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store ``obj`` unconditionally (what another client, e.g. Helm, does), with a new resourceVersion."""
        with self._lock:
            return self._store(path, obj)

    def _store(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        self._version += 1
        stored = copy.deepcopy(obj)
        stored.setdefault("metadata", {})["resourceVersion"] = str(self._version)
        self.objects[path] = stored
        return copy.deepcopy(stored)

    def get(self, path: str) -> dict[str, Any] | None:
        with self._lock:
            found = copy.deepcopy(self.objects.get(path))
        self.after_get(path)
        return found

    def write(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to a collection or PUT to an object, refusing what the real API server refuses with 409."""
        with self._lock:
            if method == "POST":
                path = f"{path}/{body['metadata']['name']}"
                if path in self.objects:
                    self.conflicts += 1
                    raise Conflict(f"POST {path}: AlreadyExists")
            else:
                current = self.objects.get(path)
                sent = body.get("metadata", {}).get("resourceVersion")
                if current is None or sent != current["metadata"]["resourceVersion"]:
                    self.conflicts += 1
                    raise Conflict(f"PUT {path}: the object has been modified")
            self.writes.append((method, path))
            return self._store(path, body)

    # CertificateAPI
    def get_secret(self) -> dict[str, Any] | None:
        return self.get(f"{SECRETS_PATH}/{SECRET}")

    def create_secret(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.write("POST", SECRETS_PATH, body)

    def replace_secret(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.write("PUT", f"{SECRETS_PATH}/{SECRET}", body)

    def get_webhooks(self, kind: WebhookKind) -> dict[str, Any] | None:
        return self.get(CONFIG_PATHS[kind])

    def replace_webhooks(self, kind: WebhookKind, body: dict[str, Any]) -> dict[str, Any]:
        return self.write("PUT", CONFIG_PATHS[kind], body)

    @property
    def secret(self) -> dict[str, Any]:
        return self.objects[f"{SECRETS_PATH}/{SECRET}"]

    def ca_bundles(self) -> list[str]:
        return [hook["clientConfig"].get("caBundle", "") for path in CONFIG_PATHS.values()
                for hook in self.objects[path]["webhooks"]]

    @contextmanager
    def serve_http(self, token: str) -> Iterator[str]:
        """Serve this cluster over plain HTTP on loopback, requiring ``Authorization: Bearer <token>``."""
        cluster = self

        class Handler(JSONHandler):
            def _handle(self) -> None:
                path, _, query = self.path.partition("?")
                if self.headers.get("Authorization") != f"Bearer {token}":
                    self.answer(401, {"kind": "Status", "message": "Unauthorized"})
                    return
                if self.command == "GET":
                    found = cluster.get(path)
                    self.answer(200 if found else 404, found or {"kind": "Status", "message": "not found"})
                    return
                if query != "fieldManager=meshguard":
                    self.answer(400, {"kind": "Status", "message": f"unexpected query {query!r}"})
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                try:
                    self.answer(201 if self.command == "POST" else 200, cluster.write(self.command, path, body))
                except Conflict as exc:
                    self.answer(409, {"kind": "Status", "message": str(exc)})

            do_GET = do_POST = do_PUT = _handle

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


# --- tests -------------------------------------------------------------------------------------------------------

SETTINGS = CertificateSettings(self_managed=True, secret_name=SECRET, service="meshguard",
                               mutating_webhook=WEBHOOKS, validating_webhook=WEBHOOKS)
NAMES = certs.service_dns_names("meshguard", NAMESPACE)
DAY = dt.timedelta(days=1)


def _material(ca_days: int = 3650, leaf_days: int = 365, service: str = "meshguard") -> Material:
    ca = certs.generate_ca(days=ca_days)
    return Material((ca.cert,), ca.key, certs.issue_serving(ca, service, NAMESPACE, days=leaf_days))


def _secret(material: Material | None) -> dict[str, Any]:
    """A Secret as the chart creates it (empty) or as a previous pass left it."""
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": SECRET, "namespace": NAMESPACE, "labels": {"app.kubernetes.io/name": "meshguard"}}}
    if material is not None:
        secret["data"] = material.secret_data()
    return secret


def _manager(cluster: FakeCluster, cert_dir: Path) -> SelfManagedCertificates:
    return SelfManagedCertificates(SETTINGS, NAMESPACE, cert_dir, cluster)


def handshake(cert_dir: Path, ca_bundle_b64: str, hostname: str = f"meshguard.{NAMESPACE}.svc") -> x509.Certificate:
    """A TLS handshake between the server's own context (loaded by the hot-reload code) and a client that trusts
    exactly what the API server would: the webhook configuration's caBundle. Returns the certificate served."""
    server = CertificateReloader(TLSSettings(cert_dir=cert_dir)).context
    client = ssl.create_default_context(cadata=base64.b64decode(ca_bundle_b64).decode())
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    der = c.getpeercert(binary_form=True)
    assert der, "handshake did not complete"
    return x509.load_der_x509_certificate(der)


def test_secret_data_round_trips() -> None:
    material = _material()
    again = read_secret(material.secret_data())
    assert again is not None
    assert again.cas == material.cas and again.serving.cert == material.serving.cert
    assert again.ca.key_pem() == material.ca.key_pem() and again.serving.key_pem() == material.serving.key_pem()


@pytest.mark.parametrize("damage", ["missing", "not-base64", "not-pem", "other-key", "empty"])
def test_unusable_secret_reads_as_nothing(damage: str) -> None:
    data = _material().secret_data()
    if damage == "missing":
        del data["tls.key"]
    elif damage == "not-base64":
        data["ca.crt"] = "%%%"
    elif damage == "not-pem":
        data["tls.crt"] = base64.b64encode(b"hello").decode()
    elif damage == "other-key":
        data["tls.key"] = _material().secret_data()["tls.key"]
    else:
        data = {}
    assert read_secret(data) is None


def test_plan() -> None:
    fresh = _material()
    now = dt.datetime.now(dt.UTC)
    assert plan(None, NAMES, SETTINGS) == "rotate"
    assert plan(fresh, NAMES, SETTINGS) == "keep"
    # Renewal starts renew_before_days (90) ahead of the serving certificate's expiry, not at it.
    assert plan(fresh, NAMES, SETTINGS, now=now + 270 * DAY) == "keep"
    assert plan(fresh, NAMES, SETTINGS, now=now + 280 * DAY) == "renew"
    assert plan(_material(service="old-name"), NAMES, SETTINGS) == "renew"
    stranger = _material()
    assert plan(Material(fresh.cas, fresh.ca_key, stranger.serving), NAMES, SETTINGS) == "renew"
    # The CA must outlive a fresh serving certificate plus the margin: 365 + 90 days.
    assert plan(_material(ca_days=460), NAMES, SETTINGS) == "keep"
    assert plan(_material(ca_days=450), NAMES, SETTINGS) == "rotate"


def test_issue_renew_keeps_the_ca_and_rotate_keeps_the_previous_one_trusted() -> None:
    old = _material()
    renewed = issue(old, "renew", "meshguard", NAMESPACE, SETTINGS)
    assert renewed.cas == old.cas and renewed.serving.cert != old.serving.cert
    assert renewed.serving.cert.issuer == old.cas[0].subject
    assert dns_names(renewed.serving.cert) == frozenset(NAMES)

    rotated = issue(old, "rotate", "meshguard", NAMESPACE, SETTINGS)
    assert rotated.cas[1:] == old.cas and rotated.cas[0] != old.cas[0]
    rotated.serving.cert.verify_directly_issued_by(rotated.cas[0])
    # Once the previous CA has expired it is dropped at the next issue.
    later = dt.datetime.now(dt.UTC) + 3651 * DAY
    assert issue(rotated, "renew", "meshguard", NAMESPACE, SETTINGS, now=later).cas == rotated.cas[:1]


def test_with_ca_bundle_widens_but_never_narrows_a_valid_bundle() -> None:
    old, new = _material(), _material()
    config = webhook_configuration("mutating", ("a.inject.meshguard.io", "b.inject.meshguard.io"))
    first = with_ca_bundle(config, old.bundle_pem())
    assert first is not None and config["webhooks"][0]["clientConfig"].get("caBundle") is None  # a copy
    assert {h["clientConfig"]["caBundle"] for h in first["webhooks"]} == {base64.b64encode(old.bundle_pem()).decode()}
    assert first["webhooks"][0]["clientConfig"]["service"] == config["webhooks"][0]["clientConfig"]["service"]
    assert with_ca_bundle(first, old.bundle_pem()) is None

    both = new.bundle_pem() + old.bundle_pem()
    widened = with_ca_bundle(first, both)
    assert widened is not None
    # A replica that still reads the old Secret must not take the new CA away again.
    assert with_ca_bundle(widened, old.bundle_pem()) is None
    # ... but an expired CA is dropped, and an unreadable caBundle is replaced.
    assert with_ca_bundle(widened, new.bundle_pem(), now=dt.datetime.now(dt.UTC) + 3651 * DAY) is not None
    widened["webhooks"][1]["clientConfig"]["caBundle"] = "bm90IGEgY2VydA=="
    repaired = with_ca_bundle(widened, both)
    assert repaired is not None
    assert repaired["webhooks"][1]["clientConfig"]["caBundle"] == base64.b64encode(both).decode()


@pytest.mark.parametrize("existing", [None, "chart"], ids=["no-secret", "empty-secret-from-the-chart"])
def test_first_pass_issues_trusts_and_serves(tmp_path: Path, existing: str | None) -> None:
    cluster = FakeCluster(secret=_secret(None) if existing else None)
    assert _manager(cluster, tmp_path).sync() is True

    method = "PUT" if existing else "POST"
    assert cluster.writes[0] == (method, f"{SECRETS_PATH}/{SECRET}")
    secret = cluster.secret
    assert secret["type"] == "Opaque" and set(secret["data"]) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    if existing:
        assert secret["metadata"]["labels"] == {"app.kubernetes.io/name": "meshguard"}  # the chart's, kept
    material = read_secret(secret["data"])
    assert material is not None
    assert (tmp_path / "tls.crt").read_bytes() == material.serving.cert_pem()
    assert (tmp_path / "tls.key").stat().st_mode & 0o777 == 0o600
    assert set(cluster.ca_bundles()) == {base64.b64encode(material.bundle_pem()).decode()}
    assert handshake(tmp_path, cluster.ca_bundles()[0]) == material.serving.cert

    writes = len(cluster.writes)
    assert _manager(cluster, tmp_path).sync() is True
    assert len(cluster.writes) == writes, "a pass with everything in step must not write"


def test_replicas_starting_together_agree_on_one_certificate(tmp_path: Path) -> None:
    cluster = FakeCluster(secret=_secret(None))
    replicas = 3
    lined_up = threading.Barrier(replicas)
    first_reads = threading.local()

    def wait_for_the_others(path: str) -> None:
        # Every replica reads the empty Secret before any of them writes: the worst case, forced.
        if path.endswith("/secrets/" + SECRET) and not getattr(first_reads, "done", False):
            first_reads.done = True
            lined_up.wait(timeout=30)

    cluster.after_get = wait_for_the_others
    dirs = [tmp_path / f"replica{i}" for i in range(replicas)]
    with ThreadPoolExecutor(replicas) as pool:
        results = list(pool.map(lambda d: _manager(cluster, d).sync(), dirs))

    assert results == [True] * replicas
    secret_writes = [w for w in cluster.writes if "/secrets/" in w[1]]
    assert len(secret_writes) == 1 and cluster.conflicts >= replicas - 1
    material = read_secret(cluster.secret["data"])
    assert material is not None
    for d in dirs:
        assert (d / "tls.crt").read_bytes() == material.serving.cert_pem()
        assert handshake(d, cluster.ca_bundles()[0]) == material.serving.cert


def test_renewal_keeps_the_ca_and_leaves_the_webhooks_alone(tmp_path: Path) -> None:
    expiring = _material(leaf_days=30)
    cluster = FakeCluster(secret=_secret(expiring))
    _manager(cluster, tmp_path).sync()
    bundles = cluster.ca_bundles()
    writes = len(cluster.writes)

    renewed = read_secret(cluster.secret["data"])
    assert renewed is not None and renewed.cas == expiring.cas
    assert renewed.serving.cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > 360 * DAY
    assert cluster.ca_bundles() == bundles and len(cluster.writes) == writes
    assert handshake(tmp_path, bundles[0]) == renewed.serving.cert


def test_ca_rotation_keeps_replicas_with_the_previous_certificate_working(tmp_path: Path) -> None:
    old = _material(ca_days=400)
    cluster = FakeCluster(secret=_secret(old))
    lagging = tmp_path / "lagging"
    certs.write_pair(lagging, old.serving, "tls.crt", "tls.key")  # a replica that has not re-synced yet

    assert _manager(cluster, tmp_path / "renewing").sync() is True
    rotated = read_secret(cluster.secret["data"])
    assert rotated is not None and rotated.cas[0] != old.cas[0] and rotated.cas[1:] == old.cas
    bundle = cluster.ca_bundles()[0]
    assert handshake(tmp_path / "renewing", bundle) == rotated.serving.cert
    assert handshake(lagging, bundle) == old.serving.cert
    _manager(cluster, lagging).sync()
    assert handshake(lagging, bundle) == rotated.serving.cert


def test_missing_webhook_configuration_is_retried_and_files_are_written_only_to_start(tmp_path: Path) -> None:
    cluster = FakeCluster(secret=_secret(None), webhooks=False)
    manager = _manager(cluster, tmp_path)
    assert manager.sync() is False and manager.in_step is False
    first = (tmp_path / "tls.crt").read_bytes()  # written anyway: the server must start to be called at all

    # While the webhooks cannot be made to trust it, a rotated certificate is not served.
    cluster.put(f"{SECRETS_PATH}/{SECRET}", _secret(_material(ca_days=400)))
    assert manager.sync() is False
    assert (tmp_path / "tls.crt").read_bytes() == first

    for kind in ("mutating", "validating"):
        cluster.put(CONFIG_PATHS[kind], webhook_configuration(kind, ("x.meshguard.io",)))
    assert manager.sync() is True
    assert (tmp_path / "tls.crt").read_bytes() != first
    served = handshake(tmp_path, cluster.ca_bundles()[0])
    assert served.serial_number != x509.load_pem_x509_certificate(first).serial_number


def test_a_concurrent_edit_of_a_webhook_configuration_is_not_lost(tmp_path: Path) -> None:
    cluster = FakeCluster(secret=_secret(None))
    path = CONFIG_PATHS["validating"]
    edited = threading.Event()

    def helm_edits_once(read: str) -> None:
        if read == path and not edited.is_set():
            edited.set()
            configuration = cluster.objects[path]
            configuration["webhooks"][0]["timeoutSeconds"] = 7
            cluster.put(path, configuration)

    cluster.after_get = helm_edits_once
    assert _manager(cluster, tmp_path).sync() is True
    assert cluster.conflicts == 1
    hook = cluster.objects[path]["webhooks"][0]
    assert hook["timeoutSeconds"] == 7 and hook["clientConfig"]["caBundle"]


def test_an_object_that_keeps_changing_gives_up_with_a_message(tmp_path: Path) -> None:
    cluster = FakeCluster(secret=_secret(None))
    path = f"{SECRETS_PATH}/{SECRET}"
    cluster.after_get = lambda read: cluster.put(path, cluster.objects[path]) if read == path else None
    with pytest.raises(KubeError, match=f"secret {NAMESPACE}/{SECRET} kept changing"):
        _manager(cluster, tmp_path).sync()
    assert not (tmp_path / "tls.crt").exists()


def test_write_serving_only_writes_what_changed(tmp_path: Path) -> None:
    material = _material()
    assert write_serving(tmp_path, material) is True
    assert write_serving(tmp_path, material) is False
    assert write_serving(tmp_path, issue(material, "renew", "meshguard", NAMESPACE, SETTINGS)) is True


@pytest.mark.parametrize(("values", "fragment"), [
    ({"renew_before_days": 365}, "renew_before_days (365) must be less than validity_days (365)"),
    ({"validity_days": 1}, "certificates.validity_days"),
    ({"secret_name": ""}, "certificates.secret_name"),
])
def test_settings_are_checked(values: dict[str, Any], fragment: str) -> None:
    with pytest.raises(config.ConfigError, match=re.escape(fragment)):
        config.load(overrides={"certificates": values})


def test_background_loop_survives_failures_and_catches_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selfcert, "RETRY_SECONDS", 0.01)
    cluster = FakeCluster(secret=_secret(None), webhooks=False)
    manager = _manager(cluster, tmp_path)
    assert manager.sync() is False
    for kind in ("mutating", "validating"):
        cluster.put(CONFIG_PATHS[kind], webhook_configuration(kind, ("x.meshguard.io",)))
    failures: list[Exception] = [KubeError("GET secret: HTTP 503"), ValueError("an unexpected bug")]
    read_secret_from_cluster = cluster.get_secret

    def flaky() -> dict[str, Any] | None:
        if failures:
            raise failures.pop(0)
        return read_secret_from_cluster()

    cluster.get_secret = flaky  # type: ignore[method-assign]

    async def until_in_step() -> None:
        loop = asyncio.create_task(manager.run())
        for _ in range(3000):
            if manager.in_step:
                break
            await asyncio.sleep(0.01)
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop

    asyncio.run(until_in_step())
    assert not failures and manager.in_step
    material = read_secret(cluster.secret["data"])
    assert material is not None and handshake(tmp_path, cluster.ca_bundles()[0]) == material.serving.cert

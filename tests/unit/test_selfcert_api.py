"""The self-managed certificate's edge: :class:`KubeCertificateAPI` through the real kubernetes client and a
kubeconfig, over HTTP to the in-memory API server, and a real ``meshguard serve`` process that bootstraps its
serving certificate that way and serves it.
"""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tests.conftest import start_server
from tests.unit.test_selfcert import CONFIG_PATHS, NAMESPACE, SECRET, SECRETS_PATH, WEBHOOKS, FakeCluster
from webhook.config import CertificateSettings
from webhook.errors import Conflict, KubeError
from webhook.selfcert import KubeCertificateAPI, SelfManagedCertificates, read_secret
from webhook.state.kube import api_client

TOKEN = "test-token"
SETTINGS = CertificateSettings(self_managed=True, secret_name=SECRET, mutating_webhook=WEBHOOKS,
                               validating_webhook=WEBHOOKS)


def _kubeconfig(path: Path, server: str, token: str = TOKEN) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))
    return path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FakeCluster, Path]]:
    """A cluster without the Secret, served over HTTP, and a kubeconfig for it."""
    cluster = FakeCluster()
    with cluster.serve_http(TOKEN) as url:
        yield cluster, _kubeconfig(tmp_path / "kubeconfig", url)


def _api(kubeconfig: Path) -> KubeCertificateAPI:
    return KubeCertificateAPI(api_client(kubeconfig), NAMESPACE, SETTINGS)


def test_calls_map_to_api_paths_and_statuses(served: tuple[FakeCluster, Path]) -> None:
    cluster, kubeconfig = served
    api = _api(kubeconfig)
    assert api.get_secret() is None  # 404 on a GET is "not there", not an error
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": NAMESPACE}}
    created = api.create_secret(body)
    assert created["metadata"]["resourceVersion"] and cluster.writes == [("POST", f"{SECRETS_PATH}/{SECRET}")]
    with pytest.raises(Conflict, match="HTTP 409: POST .*AlreadyExists"):
        api.create_secret(body)
    with pytest.raises(Conflict):
        api.replace_secret({**body, "metadata": {**body["metadata"], "resourceVersion": "0"}})
    assert api.replace_secret({**created, "data": {"a": "Yg=="}})["data"] == {"a": "Yg=="}

    mutating = api.get_webhooks("mutating")
    assert mutating is not None and mutating["kind"] == "MutatingWebhookConfiguration"
    mutating["webhooks"][0]["clientConfig"]["caBundle"] = "Yg=="
    api.replace_webhooks("mutating", mutating)
    assert cluster.objects[CONFIG_PATHS["mutating"]]["webhooks"][0]["clientConfig"]["caBundle"] == "Yg=="
    assert api.get_webhooks("validating")["kind"] == "ValidatingWebhookConfiguration"  # type: ignore[index]


def test_refusals_and_unreachable_servers_are_kube_errors(tmp_path: Path, served: tuple[FakeCluster, Path]) -> None:
    _, kubeconfig = served
    server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    with pytest.raises(KubeError, match="GET .*/secrets/meshguard-tls: HTTP 401: Unauthorized"):
        _api(_kubeconfig(tmp_path / "wrong-token", server, token="wrong")).get_secret()
    with pytest.raises(KubeError, match="PUT .*/validatingwebhookconfigurations/meshguard: HTTP 409"):
        _api(kubeconfig).replace_webhooks("validating", {"metadata": {"resourceVersion": "0"}})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(KubeError, match="GET .*/secrets/meshguard-tls"):
        _api(_kubeconfig(tmp_path / "closed", f"http://127.0.0.1:{closed}")).get_secret()


def test_a_pass_over_http(tmp_path: Path, served: tuple[FakeCluster, Path]) -> None:
    cluster, kubeconfig = served
    assert SelfManagedCertificates(SETTINGS, NAMESPACE, tmp_path, _api(kubeconfig)).sync() is True
    material = read_secret(cluster.secret["data"])
    assert material is not None and (tmp_path / "tls.crt").read_bytes() == material.serving.cert_pem()
    assert set(cluster.ca_bundles()) == {base64.b64encode(material.bundle_pem()).decode()}


def test_server_bootstraps_its_certificate_and_serves_it(tmp_path: Path, served: tuple[FakeCluster, Path]) -> None:
    cluster, kubeconfig = served
    cert_dir, state = tmp_path / "certs", tmp_path / "state"
    state.mkdir()  # cluster state from (no) files: this test is about the certificate, not the watches
    server = start_server(
        tmp_path / "server",
        {"tls": {"cert_dir": str(cert_dir)}, "state_dir": str(state),
         "certificates": {"self_managed": True, "secret_name": SECRET, "mutating_webhook": WEBHOOKS,
                          "validating_webhook": WEBHOOKS}},
        env={"KUBECONFIG": str(kubeconfig), "MESHGUARD_NAMESPACE": NAMESPACE},
        dev=False,
    )
    try:
        material = read_secret(cluster.secret["data"])
        assert material is not None
        host, port = server.url.removeprefix("https://").split(":")
        trust = ssl.create_default_context(cadata=base64.b64decode(cluster.ca_bundles()[0]).decode())
        with socket.create_connection((host, int(port)), timeout=10) as sock, \
                trust.wrap_socket(sock, server_hostname=f"meshguard.{NAMESPACE}.svc") as tls:
            served_cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
        assert served_cert == material.serving.cert
    finally:
        server.stop()


def test_server_exits_with_a_message_when_the_api_refuses(tmp_path: Path, served: tuple[FakeCluster, Path]) -> None:
    _, kubeconfig = served
    server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    with pytest.raises(RuntimeError, match="cannot set up the self-managed serving certificate: .*HTTP 401"):
        start_server(tmp_path / "server", {"certificates": {"self_managed": True}, "state_dir": str(tmp_path)},
                     env={"KUBECONFIG": str(_kubeconfig(tmp_path / "wrong", server, token="wrong"))}, dev=False)

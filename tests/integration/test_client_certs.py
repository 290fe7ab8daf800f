"""``tls.client_ca_file``: only clients presenting a certificate from that CA (the API server, through its admission
kubeconfig) are served; everyone else is refused during the TLS handshake."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, review
from webhook import certs

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
       "spec": {"containers": [{"name": "app", "image": "nginx"}]}}


def client_context(server: RunningServer, issued: certs.Issued | None, directory: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=server.ca)
    if issued is not None:
        directory.mkdir(parents=True, exist_ok=True)
        certs.write_pair(directory, issued, "client.crt", "client.key")
        ctx.load_cert_chain(str(directory / "client.crt"), str(directory / "client.key"))
    return ctx


def post(server: RunningServer, ctx: ssl.SSLContext) -> httpx.Response:
    with httpx.Client(base_url=server.url, verify=ctx, timeout=10) as client:
        return client.post("/mutate", json=review(POD, namespace="kube-system"))


def answered(server: RunningServer) -> float:
    """Admission requests the server has answered, from its metrics."""
    text = httpx.get(f"{server.health_url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("meshguard_admission_requests_total{"))


@pytest.fixture
def trusted_ca(tmp_path: Path) -> certs.Issued:
    return certs.generate_ca("apiserver-client-ca")


@pytest.fixture
def mtls_server(server_factory: Callable[..., RunningServer], tmp_path: Path,
                trusted_ca: certs.Issued) -> RunningServer:
    certs.write_pair(tmp_path / "client-ca", trusted_ca, certs.CA_CERT, certs.CA_KEY)
    return server_factory(config={"tls": {"client_ca_file": str(tmp_path / "client-ca" / certs.CA_CERT)}})


def test_a_client_certificate_from_the_configured_ca_is_served(mtls_server: RunningServer, trusted_ca: certs.Issued,
                                                               tmp_path: Path) -> None:
    apiserver = certs.issue_leaf(trusted_ca, "kube-apiserver", server=False, client=True)
    response = post(mtls_server, client_context(mtls_server, apiserver, tmp_path / "good"))
    assert response.status_code == 200 and response.json()["response"]["allowed"] is True
    assert answered(mtls_server) == 1


@pytest.mark.parametrize("presented", ["none", "other CA", "server-only key usage"])
def test_other_clients_are_refused(mtls_server: RunningServer, trusted_ca: certs.Issued, tmp_path: Path,
                                   presented: str) -> None:
    issued = {
        "none": None,
        "other CA": certs.issue_leaf(certs.generate_ca("stranger"), "kube-apiserver", server=False, client=True),
        "server-only key usage": certs.issue_leaf(trusted_ca, "kube-apiserver", server=True, client=False),
    }[presented]
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        post(mtls_server, client_context(mtls_server, issued, tmp_path / "bad"))
    assert answered(mtls_server) == 0  # nothing reached a webhook


def test_without_client_ca_any_client_is_served(server: RunningServer, tmp_path: Path) -> None:
    assert post(server, client_context(server, None, tmp_path)).status_code == 200

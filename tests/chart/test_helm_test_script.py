"""The chart's `helm test` script (charts/meshguard/files/helm-test.py) against a stand-in API server over HTTPS.

The stand-in does what kube-apiserver does with the dry-run pod: it sends it through the real meshguard server's
/mutate as an AdmissionReview and applies the JSON patch, or answers as the API server does when a webhook denies
or cannot be reached. The script must pass exactly when the sidecar was injected or meshguard's policy answered.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from tests.chart.conftest import CHART
from tests.conftest import RunningServer, review
from tests.fakehttp import JSONHandler
from webhook import certs
from webhook.injection.decision import PROXY_NAME

SCRIPT = CHART / "files" / "helm-test.py"
TOKEN = "helm-test-token"
Answer = Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]


def through_meshguard(server: RunningServer) -> Answer:
    """The API server's part: call /mutate with the pod and apply the patch it answers with."""
    def answer(pod: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with server.client() as client:
            response = client.post("/mutate", json=review(pod, namespace="shop", dry_run=True)).json()["response"]
        patch = json.loads(base64.b64decode(response["patch"])) if response.get("patch") else []
        return 201, jsonpatch.apply_patch(pod, patch)
    return answer


def status(code: int, message: str) -> Answer:
    return lambda pod: (code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                               "code": code})


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Callable[[Answer], subprocess.CompletedProcess[str]]]:
    """``api(answer)`` runs the script against a stand-in API server that answers the pod POST with ``answer``."""
    ca = certs.generate_ca()
    serving = certs.issue_serving(ca, "kubernetes", "default", dev=True)
    certs.write_pair(tmp_path, serving, "tls.crt", "tls.key")
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN + "\n")
    (account / "ca.crt").write_bytes(ca.cert_pem())
    seen: list[str] = []
    current: list[Answer] = []

    class Handler(JSONHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(self.path)
            if self.headers.get("Authorization") != f"Bearer {TOKEN}" or self.path != \
                    "/api/v1/namespaces/shop/pods?dryRun=All":
                code, payload = 400, {"message": f"unexpected request {self.path}"}
            else:
                code, payload = current[0](body)
            self.answer(code, payload)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def run(answer: Answer, identity: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        current[:] = [answer]
        env = {**os.environ, "KUBERNETES_SERVICE_HOST": "127.0.0.1",
               "KUBERNETES_SERVICE_PORT": str(httpd.server_address[1]), "SERVICE_ACCOUNT_DIR": str(account),
               **(identity or {})}
        result = subprocess.run([sys.executable, str(SCRIPT), "shop", PROXY_NAME], env=env, capture_output=True,
                                text=True, timeout=60)
        assert seen[-1:] == ["/api/v1/namespaces/shop/pods?dryRun=All"], result.stdout + result.stderr
        return result

    yield run
    httpd.shutdown()
    httpd.server_close()


def test_passes_when_meshguard_injects_the_pod(api: Callable[[Answer], Any], server: RunningServer) -> None:
    result = api(through_meshguard(server))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"ok: meshguard injected {PROXY_NAME}")


def test_fails_when_the_pod_comes_back_without_the_sidecar(api: Callable[[Answer], Any]) -> None:
    result = api(lambda pod: (201, pod))
    assert result.returncode == 1
    assert f"came back without {PROXY_NAME} (containers: app)" in result.stdout


def test_passes_when_meshguard_policy_denies(api: Callable[[Answer], Any]) -> None:
    message = ('admission webhook "workloads.validate.meshguard.io" denied the request: Pod shop/x: no '
               "NetworkPolicy selects it; add one")
    result = api(status(403, message))
    assert result.returncode == 0 and message in result.stdout


@pytest.mark.parametrize(("code", "message"), [
    (500, 'Internal error occurred: failed calling webhook "namespace.inject.meshguard.io": failed to call '
          'webhook: Post "https://mg-meshguard.mesh-system.svc:443/mutate": dial tcp: connection refused'),
    (403, 'pods is forbidden: User "system:serviceaccount:mesh-system:mg-meshguard-test" cannot create resource'),
    (403, 'admission webhook "other.example.com" denied the request: no'),
])
def test_fails_with_the_api_servers_message(api: Callable[[Answer], Any], code: int, message: str) -> None:
    result = api(status(code, message))
    assert result.returncode == 1 and f"FAIL: the API server answered {code}: {message}" in result.stdout


def _identity(tmp_path: Path, ca: certs.Issued, trusted: certs.Issued, account: str) -> dict[str, str]:
    """A certificate volume as the kubelet mounts it for the test pod: its certificate and a trust bundle."""
    directory = tmp_path / f"identity-{account}"
    certs.write_pair(directory, certs.issue_workload(ca, "meshguard", account), "tls.crt", "tls.key")
    (directory / "ca.crt").write_bytes(certs.generate_ca("another").cert_pem() + trusted.cert_pem())
    return {"IDENTITY_DIR": str(directory), "IDENTITY_SPIFFE_ID": "spiffe://cluster.local/ns/meshguard/sa/test"}


def test_the_pods_own_certificate_must_name_it_and_chain_to_the_mesh_ca(
        api: Callable[..., Any], server: RunningServer, tmp_path: Path) -> None:
    mesh = certs.generate_ca("mesh")
    good = api(through_meshguard(server), _identity(tmp_path, mesh, mesh, "test"))
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.startswith("ok: this pod's workload certificate names spiffe://cluster.local/ns/meshguard/"
                                  "sa/test, issued by")
    other = api(through_meshguard(server), _identity(tmp_path, mesh, mesh, "intruder"))
    assert other.returncode == 1 and "names ['spiffe://cluster.local/ns/meshguard/sa/intruder']" in other.stdout
    foreign = api(through_meshguard(server), _identity(tmp_path, certs.generate_ca("foreign"), mesh, "test"))
    assert foreign.returncode == 1 and "not signed by the mesh CA" in foreign.stdout

"""Workload certificates on a real node: from meshguard's signer (the kubelet makes the key and the request, the
signer in meshguard's pods answers it, and the pod starts with its own certificate: Kubernetes Pod Certificates),
and, as on clusters without them, from the Secret meshguard keeps for each ServiceAccount."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509

from tests.conftest import ROOT
from tests.e2e.cluster import RELEASE, RELEASE_NAMESPACE, wait_for
from tests.e2e.objects import PROXY
from tests.node.conftest import Cluster
from tests.node.images import APP_IMAGE, PYTHON
from tests.node.test_workloads import app

SIGNER = "meshguard.io/workload"
BUNDLE = "meshguard.io:workload:mesh-ca"
CERTS = "/var/run/identity"


def identity_pod(name: str, key_type: str) -> dict[str, Any]:
    """A pod mounting a certificate from meshguard's signer and the mesh CA's ClusterTrustBundle."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "app", "image": APP_IMAGE, "imagePullPolicy": "Never",
                                     "volumeMounts": [{"name": "identity", "mountPath": CERTS}]}],
                     "volumes": [{"name": "identity", "projected": {"sources": [
                         {"podCertificate": {"signerName": SIGNER, "keyType": key_type,
                                             "credentialBundlePath": "credential-bundle.pem"}},
                         {"clusterTrustBundle": {"name": BUNDLE, "path": "ca.crt"}}]}}]}}


def test_a_pod_starts_with_its_own_certificate_for_its_service_account(cluster: Cluster) -> None:
    namespace = cluster.plain_namespace("identity")
    cluster.kubectl("create", "serviceaccount", "payments", "-n", namespace)
    pod = identity_pod("payments", "ECDSAP256")
    pod["spec"]["serviceAccountName"] = "payments"
    cluster.apply([pod], namespace)
    cluster.kubectl("wait", "--for=condition=Ready", "pod/payments", "-n", namespace, "--timeout=120s", timeout=130)
    read = cluster.exec(namespace, "payments", str(PYTHON), "-c",
                        f"import json; print(json.dumps([open('{CERTS}/credential-bundle.pem').read(), "
                        f"open('{CERTS}/ca.crt').read()]))")
    bundle, ca_pem = json.loads(read.stdout)
    assert "PRIVATE KEY" in bundle  # the key was made on the node and never left it
    (leaf,) = x509.load_pem_x509_certificates(bundle.split("-----END PRIVATE KEY-----")[1].encode())
    ca = x509.load_pem_x509_certificate(ca_pem.encode())
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == [f"spiffe://cluster.local/ns/{namespace}/sa/payments"]
    # Two replicas follow the requests; the status was written once, by one of them.
    (request,) = cluster.json("get", "podcertificaterequests", "-n", namespace)["items"]
    assert [c["type"] for c in request["status"]["conditions"]] == ["Issued"]
    answered = [line for p in cluster.json("get", "pods", "-n", "meshguard", "-l",
                                           "app.kubernetes.io/component=webhook")["items"]
                for line in cluster.logs("meshguard", p["metadata"]["name"], "meshguard").splitlines()
                if request["metadata"]["name"] in line and "answered" in line and '"condition"' in line]
    assert len(answered) == 1, answered


def test_a_key_type_envoy_cannot_serve_is_denied_with_the_reason(cluster: Cluster) -> None:
    namespace = cluster.plain_namespace("identity")
    cluster.apply([identity_pod("edwards", "ED25519")], namespace)

    def denied() -> dict[str, Any] | None:
        items = cluster.json("get", "podcertificaterequests", "-n", namespace)["items"]
        conditions = items[0].get("status", {}).get("conditions", []) if items else []
        return conditions[0] if conditions else None

    condition = wait_for("the request to be answered", denied, timeout=60)
    assert (condition["type"], condition["reason"]) == ("Denied", "UnsupportedKeyType")
    assert cluster.json("get", "pod", "edwards", "-n", namespace)["status"]["phase"] == "Pending"


@pytest.fixture
def secret_mode(cluster: Cluster) -> Iterator[None]:
    """meshguard upgraded to ``identity.mode: secret`` (what ``auto`` picks on a cluster without Pod
    Certificates), and back to ``auto`` afterwards."""
    def mode(value: str) -> None:
        cluster.plane.helm("upgrade", RELEASE, str(ROOT / "charts" / "meshguard"), "--namespace",
                           RELEASE_NAMESPACE, "--reuse-values", "--set", f"identity.mode={value}", "--wait",
                           "--timeout", "5m")
        # Until the old replicas are gone they still answer admissions, with the other mode's volume.
        wait_for("the old replicas to be gone", lambda: not [
            p for p in cluster.json("get", "pods", "-n", RELEASE_NAMESPACE, "-l",
                                    "app.kubernetes.io/component=webhook")["items"]
            if p["metadata"].get("deletionTimestamp")], timeout=120)

    mode("secret")
    try:
        yield
    finally:
        mode("auto")


def two_accounts_talk(cluster: Cluster, name: str) -> dict[str, dict[str, Any]]:
    """A server Deployment of ServiceAccount payments and two callers (frontend, default) in one mesh namespace,
    each calling the server's Service: the server proxy's access log names both callers' identities. Returns the
    pods' certificate volumes by Deployment."""
    namespace = cluster.mesh_namespace(name)
    for account in ("payments", "frontend"):
        cluster.kubectl("create", "serviceaccount", account, "-n", namespace)
    deployments = {"web": "payments", "client": "frontend", "other": None}
    for deployment, account in deployments.items():
        objects = app(deployment)
        if account:
            objects[0]["spec"]["template"]["spec"]["serviceAccountName"] = account
        cluster.apply(objects, namespace)
    pods = {deployment: cluster.wait_ready(namespace, f"app={deployment}")[0] for deployment in deployments}
    web_ip = cluster.wait_routed(namespace, "web")
    for caller in ("client", "other"):
        called = cluster.get(namespace, pods[caller]["metadata"]["name"], f"http://{web_ip}/")
        assert called.returncode == 0, called.stdout + called.stderr
    # The server's proxy verified each caller's certificate: two accounts, two identities in its access log.
    prefix = f"peer=spiffe://cluster.local/ns/{namespace}/sa/"
    wait_for("both callers in the server proxy's access log", lambda: {
        f"{prefix}frontend", f"{prefix}default"} <= set(cluster.logs(
            namespace, pods["web"]["metadata"]["name"], PROXY).replace(" ", "\n").splitlines()), timeout=30)
    return {deployment: {v["name"]: v for v in pod["spec"]["volumes"]}["meshguard-certs"]
            for deployment, pod in pods.items()}


def helm_test(cluster: Cluster) -> str:
    """``helm test`` of the release: its pod's own certificate, and a dry-run pod through both webhooks."""
    result = cluster.plane.helm("test", RELEASE, "-n", RELEASE_NAMESPACE, "--logs", "--timeout", "3m")
    assert "ok: this pod's workload certificate names spiffe://cluster.local/ns/meshguard/sa/" in result.stdout, \
        result.stdout
    return result.stdout


def test_each_pod_presents_its_own_certificate_and_peers_tell_service_accounts_apart(cluster: Cluster) -> None:
    volumes = two_accounts_talk(cluster, "pod-certs")
    for volume in volumes.values():  # each pod its own Pod Certificate from meshguard's signer, no Secret
        assert volume["projected"]["sources"][0]["podCertificate"]["signerName"] == SIGNER
    helm_test(cluster)


def test_without_pod_certificates_each_service_account_gets_its_secret_and_peers_tell_them_apart(
        cluster: Cluster, secret_mode: None) -> None:
    volumes = two_accounts_talk(cluster, "accounts")
    for deployment, account in {"web": "payments", "client": "frontend", "other": "default"}.items():
        assert volumes[deployment]["secret"]["secretName"] == f"meshguard-identity-{account}"
    helm_test(cluster)

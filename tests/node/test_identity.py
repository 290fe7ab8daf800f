"""Workload certificates from meshguard's signer, on a real node: the kubelet makes the key and the request, the
signer in meshguard's pods answers it, and the pod starts with its own certificate (Kubernetes Pod Certificates)."""

from __future__ import annotations

import json
from typing import Any

from cryptography import x509

from tests.e2e.cluster import wait_for
from tests.node.conftest import Cluster
from tests.node.images import APP_IMAGE, PYTHON

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

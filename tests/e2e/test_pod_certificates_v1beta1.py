"""Pod Certificates on a cluster that serves them only as ``certificates.k8s.io/v1beta1`` (Kubernetes 1.35 and
1.36 with the feature enabled): the real API server configured to serve what those releases served, and
meshguard's workload identity set up against it as a replica starts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e.cluster import ControlPlane, wait_for
from tests.e2e.conftest import running_plane
from webhook.config import Settings
from webhook.errors import KubeError
from webhook.identity import controller
from webhook.identity.controller import Signer
from webhook.state.kube import api_client

V1BETA1 = "certificates.k8s.io/v1beta1"
# PodCertificateRequests and ClusterTrustBundles in v1beta1 only, as 1.36 served them.
OLDER_RELEASE = ("--runtime-config=certificates.k8s.io/v1beta1=true,certificates.k8s.io/v1/podcertificaterequests="
                 "false,certificates.k8s.io/v1/clustertrustbundles=false",)


@pytest.fixture(scope="module")
def older(workdir: Path) -> Iterator[ControlPlane]:
    yield from running_plane(workdir / "v1beta1-cluster", OLDER_RELEASE)


def _bound_pod(plane: ControlPlane) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    plane.apply([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "older-node"}},
                 {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}])
    wait_for("the default ServiceAccount", lambda: plane.kubectl(
        "get", "serviceaccount", "default", "-n", "shop", check=False).returncode == 0)
    plane.apply([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "shop"},
                  "spec": {"nodeName": "older-node", "containers": [{"name": "app", "image": "app:1"}]}}])
    return (plane.kubectl_json("get", "node", "older-node"), plane.kubectl_json("get", "pod", "web", "-n", "shop"),
            plane.kubectl_json("get", "serviceaccount", "default", "-n", "shop"))


def _follow(signer: Signer) -> None:
    with contextlib.suppress(KubeError):  # the cluster stops under the watch at the end of the module
        signer.follow_once()


def test_a_cluster_serving_pod_certificates_as_v1beta1_gets_them_signed(
        older: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    older.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "meshguard"}},
                 {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "meshguard-mesh-ca",
                                                                       "namespace": "meshguard"}}])
    # The replica's credentials: this cluster's admin (the client reads KUBECONFIG only when first imported).
    monkeypatch.setattr(controller, "api_client", lambda: api_client(older.kubeconfig))
    identity = asyncio.run(controller.start(Settings(namespace="meshguard")))
    # auto chose Pod Certificates, in v1beta1, and published the trust bundle there.
    assert identity is not None and identity.injection == {"pod_certificate_signer": "meshguard.io/workload"}
    bundle = older.kubectl_json("get", "clustertrustbundles.v1beta1.certificates.k8s.io",
                                "meshguard.io:workload:mesh-ca")
    assert bundle["spec"]["trustBundle"].encode() == identity.ca.current.bundle_pem()
    signer = identity.jobs[1].__self__
    assert isinstance(signer, Signer)
    threading.Thread(target=_follow, args=(signer,), daemon=True).start()
    # The kubelet of those releases sends the bare public key and a proof of possession (the pod's UID, signed).
    node, pod, account = _bound_pod(older)
    key = ec.generate_private_key(ec.SECP256R1())
    request = {"apiVersion": V1BETA1, "kind": "PodCertificateRequest", "metadata": {"name": "web-1",
                                                                                     "namespace": "shop"},
               "spec": {"signerName": "meshguard.io/workload", "podName": "web", "podUID": pod["metadata"]["uid"],
                        "serviceAccountName": "default", "serviceAccountUID": account["metadata"]["uid"],
                        "nodeName": "older-node", "nodeUID": node["metadata"]["uid"],
                        "pkixPublicKey": base64.b64encode(key.public_key().public_bytes(
                            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode(),
                        "proofOfPossession": base64.b64encode(key.sign(
                            pod["metadata"]["uid"].encode(), ec.ECDSA(hashes.SHA256()))).decode()}}
    older.apply([request])
    issued = wait_for("the request to be issued", lambda: (status := older.kubectl_json(
        "get", "podcertificaterequests.v1beta1.certificates.k8s.io", "web-1", "-n", "shop").get("status")) and
        status.get("certificateChain") and status, timeout=30)
    assert [c["type"] for c in issued["conditions"]] == ["Issued"]
    leaf = x509.load_pem_x509_certificate(issued["certificateChain"].encode())
    leaf.verify_directly_issued_by(identity.ca.current.signing.cert)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["spiffe://cluster.local/ns/shop/sa/default"]

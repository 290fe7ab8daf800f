"""Least privilege, checked by the real API server's RBAC authorizer: what the chart's ServiceAccount may do,
from ``kubectl auth can-i --list --as=system:serviceaccount:<namespace>:<name>``.

Every authenticated identity gets a few things from the cluster's default roles (self reviews, discovery URLs):
that baseline is measured with an account no role is bound to, and everything above it must be exactly the
chart's grants.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator

import pytest
import yaml

from tests.conftest import ROOT
from tests.e2e.cluster import RELEASE_NAMESPACE, ControlPlane, Meshguard

READ = ("get", "list", "watch")
# Namespaces are read one by one before a denial; policies only listed.
STATE = {("namespaces", "", "", verb) for verb in READ} | {
    (resource, "", "", verb) for resource in ("networkpolicies.networking.k8s.io",
                                              "peerauthentications.security.istio.io") for verb in ("list", "watch")}
Rules = set[tuple[str, str, str, str]]
# Events on the objects it denies or warns about.
EVENTS = {("events.events.k8s.io", "", "", "create")}
# The control plane (controlPlane.enabled, the default): endpoints, which pods carry the proxy, the ClusterIP
# ranges; no get.
CONTROL_PLANE = {(resource, "", "", verb) for resource in ("pods", "services", "endpointslices.discovery.k8s.io",
                                                           "servicecidrs.networking.k8s.io")
                 for verb in ("list", "watch")}
CERTS = "certificates.k8s.io"
# The workload signer (identity.mode auto or pod-certificate): follow requests, write their status, sign and
# attest for its own signer only, publish its own trust bundle.
SIGNER = {(f"podcertificaterequests.{CERTS}", "", "", verb) for verb in ("list", "watch")} | {
    (f"podcertificaterequests.{CERTS}/status", "", "", "update"),
    *((f"signers.{CERTS}", "", "meshguard.io/workload", verb) for verb in ("sign", "attest")),
    (f"clustertrustbundles.{CERTS}", "", "", "create"),
    *((f"clustertrustbundles.{CERTS}", "", "meshguard.io:workload:mesh-ca", verb) for verb in ("get", "update"))}


def account(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def granted(cluster: ControlPlane, namespace: str, name: str, where: str) -> Rules:
    """What the ServiceAccount may do in namespace ``where``, above what any authenticated account may."""
    baseline = cluster.rules_of(account(namespace, "no-role-bound-to-this"), where)
    return cluster.rules_of(account(namespace, name), where) - baseline


def test_the_release_account_reads_the_policy_state_and_signs_for_its_own_signer_only(
        cluster: ControlPlane, meshguard: Meshguard, make_namespace: Callable[..., str]) -> None:
    ca_secret = {("secrets", "", "meshguard-mesh-ca", verb) for verb in ("get", "update")}
    assert granted(cluster, RELEASE_NAMESPACE, meshguard.service_account, RELEASE_NAMESPACE) == \
        STATE | EVENTS | CONTROL_PLANE | SIGNER | ca_secret
    assert granted(cluster, RELEASE_NAMESPACE, meshguard.service_account, make_namespace()) == \
        STATE | EVENTS | CONTROL_PLANE | SIGNER
    user = account(RELEASE_NAMESPACE, meshguard.service_account)
    for verb, resource in (("get", "pods"), ("update", "pods"), ("get", "secrets"), ("create", "networkpolicies"),
                           ("delete", "namespaces"), ("update", "mutatingwebhookconfigurations")):
        answer = cluster.kubectl("auth", "can-i", verb, resource, "-A", f"--as={user}", check=False)
        assert answer.stdout.strip() == "no", (verb, resource)
    # And it is enough: the meshguard serving this suite runs with a token of this account, follows the state,
    # and published the mesh CA it made as its signer's ClusterTrustBundle.
    assert meshguard.readyz().json()["ready"] is True
    assert meshguard.metric('meshguard_state_objects{kind="Namespace"}') > 0
    bundle = cluster.kubectl_json("get", "clustertrustbundle", "meshguard.io:workload:mesh-ca")
    ca = cluster.kubectl_json("get", "secret", "meshguard-mesh-ca", "-n", RELEASE_NAMESPACE)["data"]["ca.crt"]
    assert bundle["spec"]["signerName"] == "meshguard.io/workload"
    assert bundle["spec"]["trustBundle"] == base64.b64decode(ca).decode()


@pytest.fixture
def self_managed_rbac(cluster: ControlPlane, make_namespace: Callable[..., str]) -> Iterator[tuple[str, str]]:
    """The chart's ServiceAccount and RBAC in selfManaged certificate mode, with identity.mode static (no signer)
    and no control plane,
    applied alone: installing the whole chart would point webhooks at a Service no pod backs."""
    namespace = make_namespace()
    release = "rbac-check"
    rendered = cluster.helm("template", release, str(ROOT / "charts" / "meshguard"), "--namespace", namespace,
                            "--set", "certificates.mode=selfManaged", "--set", "identity.mode=static",
                            "--set", "controlPlane.enabled=false",
                            "--show-only", "templates/serviceaccount.yaml",
                            "--show-only", "templates/rbac.yaml").stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    cluster.apply(objects, "-n", namespace)
    yield namespace, f"{release}-meshguard"
    cluster.kubectl("delete", "clusterrole,clusterrolebinding", f"{release}-meshguard", check=False)


def test_self_managed_mode_adds_its_own_secret_and_webhook_configurations_by_name(
        cluster: ControlPlane, self_managed_rbac: tuple[str, str], make_namespace: Callable[..., str]) -> None:
    namespace, name = self_managed_rbac
    webhooks = {(f"{kind}.admissionregistration.k8s.io", "", name, verb)
                for kind in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations")
                for verb in ("get", "update")}
    secret = {("secrets", "", f"{name}-tls", verb) for verb in ("get", "update")}
    assert granted(cluster, namespace, name, namespace) == STATE | EVENTS | webhooks | secret
    assert granted(cluster, namespace, name, make_namespace()) == STATE | EVENTS | webhooks

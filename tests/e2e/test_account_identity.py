"""A certificate Secret per ServiceAccount (``identity.mode: secret``, and ``auto`` where Pod Certificates are not
served), kept by meshguard against the real API server and controller manager, with exactly the chart's RBAC for
that mode: made for the accounts of mesh namespaces and of opted-in pods, renewed, repaired, written once when
two replicas race, deleted with the account, and issued again through each step of a mesh CA rotation."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import ROOT
from tests.e2e.cluster import ControlPlane, wait_for
from tests.e2e.test_rbac import EVENTS, READ, STATE, granted
from webhook import certs
from webhook.identity import authority
from webhook.identity.controller import AccountSecrets, MeshAuthority
from webhook.identity.settings import IdentitySettings
from webhook.state.kube import api_client

MESH = {"meshguard.io/inject": "enabled"}
SETTINGS = IdentitySettings(mode="secret", ca_secret="ids-meshguard-mesh-ca")
# What mode secret adds: follow accounts and opted-in pods, keep Secrets anywhere (RBAC cannot narrow to a label).
ACCOUNT_SECRETS = {("serviceaccounts", "", "", v) for v in ("list", "watch")} | \
    {("pods", "", "", v) for v in ("list", "watch")} | {("secrets", "", "", v) for v in (*READ[:2], "create", "update")}


@pytest.fixture(scope="module")
def release(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """The chart's ServiceAccount, RBAC and mesh CA Secret for identity.mode secret (no control plane), applied
    alone in a namespace of their own; returns (namespace, account, kubeconfig of that account)."""
    namespace, name = "account-identity", "ids-meshguard"
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}])
    rendered = cluster.helm("template", "ids", str(ROOT / "charts" / "meshguard"), "--namespace", namespace,
                            "--set", "identity.mode=secret", "--set", "controlPlane.enabled=false",
                            "--set", "certificates.mode=helm",
                            "--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml",
                            "--show-only", "templates/identity.yaml").stdout
    cluster.apply([o for o in yaml.safe_load_all(rendered) if o], "-n", namespace)
    kubeconfig = cluster.service_account_kubeconfig(tmp_path_factory.mktemp("ids") / "kubeconfig", namespace, name)
    yield namespace, name, kubeconfig
    cluster.kubectl("delete", "clusterrole,clusterrolebinding", name, check=False)
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def keeper(release: tuple[str, str, Path]) -> Iterator[AccountSecrets]:
    """The keeper as a replica runs it, with the release's token only."""
    namespace, _, kubeconfig = release
    client = api_client(kubeconfig)
    ca = MeshAuthority(client, namespace, SETTINGS)  # fills in the chart's empty CA Secret
    running = AccountSecrets(client, SETTINGS, "cluster.local", ca, sweep_seconds=1)
    running.start()
    yield running
    running.stop()


def _secret(cluster: ControlPlane, namespace: str, account: str) -> dict[str, Any] | None:
    found = cluster.kubectl("get", "secret", f"meshguard-identity-{account}", "-n", namespace, "-o", "json",
                            check=False)
    return yaml.safe_load(found.stdout) if found.returncode == 0 else None


def _leaf(secret: dict[str, Any]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))


def _account(cluster: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    cluster.kubectl("create", "serviceaccount", name, "-n", namespace)
    return cluster.kubectl_json("get", "serviceaccount", name, "-n", namespace)


def test_the_release_account_may_keep_secrets_and_nothing_more(
        cluster: ControlPlane, release: tuple[str, str, Path], make_namespace: Callable[..., str]) -> None:
    namespace, name, _ = release
    ca_secret = {("secrets", "", "ids-meshguard-mesh-ca", verb) for verb in ("get", "update")}
    assert granted(cluster, namespace, name, make_namespace()) == STATE | EVENTS | ACCOUNT_SECRETS
    assert granted(cluster, namespace, name, namespace) == STATE | EVENTS | ACCOUNT_SECRETS | ca_secret


def test_each_account_of_a_mesh_namespace_gets_its_own_certificate_and_loses_it_with_the_account(
        cluster: ControlPlane, keeper: AccountSecrets, make_namespace: Callable[..., str]) -> None:
    namespace = make_namespace(MESH)
    payments = _account(cluster, namespace, "payments")
    made = wait_for("the payments Secret", lambda: _secret(cluster, namespace, "payments"), timeout=30)
    assert made["type"] == "kubernetes.io/tls"
    assert made["metadata"]["ownerReferences"][0]["uid"] == payments["metadata"]["uid"]
    leaf = _leaf(made)
    leaf.verify_directly_issued_by(keeper.ca.current.signing.cert)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == [f"spiffe://cluster.local/ns/{namespace}/sa/payments"]
    assert wait_for("the default account's Secret", lambda: _secret(cluster, namespace, "default"), timeout=30)
    # The garbage collector deletes it with its account.
    cluster.kubectl("delete", "serviceaccount", "payments", "-n", namespace)
    wait_for("the Secret to go with its account", lambda: _secret(cluster, namespace, "payments") is None,
             timeout=60)


def test_outside_mesh_namespaces_only_the_accounts_of_opted_in_pods_get_one(
        cluster: ControlPlane, keeper: AccountSecrets, make_namespace: Callable[..., str]) -> None:
    namespace = make_namespace()
    _account(cluster, namespace, "batch")
    _account(cluster, namespace, "web")
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "web", "labels": {"meshguard.io/inject": "true"}},
           "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "app:1"}]}}
    cluster.apply([pod], "-n", namespace)
    assert wait_for("the opted-in pod's account's Secret", lambda: _secret(cluster, namespace, "web"), timeout=30)
    keeper.sweep()
    assert _secret(cluster, namespace, "batch") is None and _secret(cluster, namespace, "default") is None


def test_an_edited_secret_is_repaired_and_a_due_one_renewed_once_across_replicas(
        cluster: ControlPlane, keeper: AccountSecrets, release: tuple[str, str, Path],
        make_namespace: Callable[..., str]) -> None:
    namespace = make_namespace(MESH)
    uid = _account(cluster, namespace, "orders")["metadata"]["uid"]
    first = wait_for("the orders Secret", lambda: _secret(cluster, namespace, "orders"), timeout=30)
    # A tenant with write access to its namespace's Secrets puts in another account's key: the sweep repairs it.
    other = wait_for("the default Secret", lambda: _secret(cluster, namespace, "default"), timeout=30)
    cluster.kubectl("patch", "secret", "meshguard-identity-orders", "-n", namespace, "--type=merge",
                    "-p", yaml.safe_dump({"data": {"tls.key": other["data"]["tls.key"]}}))
    repaired = wait_for("the Secret to be repaired", lambda: (s := _secret(cluster, namespace, "orders")) and
                        _leaf(s).serial_number != _leaf(first).serial_number and s, timeout=30)
    # Two more replicas, 13 hours on: both judge the same copy past half-life; the first renews it, the second's
    # write conflicts and changes nothing.
    _, _, kubeconfig = release
    one, two = (AccountSecrets(api_client(kubeconfig), SETTINGS, "cluster.local", keeper.ca,
                               clock=lambda: dt.datetime.now(dt.UTC) + dt.timedelta(hours=13)) for _ in range(2))
    one.ensure(namespace, "orders", uid, current=repaired)
    renewed = _secret(cluster, namespace, "orders")
    assert renewed is not None and _leaf(renewed).serial_number != _leaf(repaired).serial_number
    two.ensure(namespace, "orders", uid, current=repaired)
    assert _secret(cluster, namespace, "orders") == renewed


def test_a_mesh_ca_rotation_reaches_the_secret_and_every_account_on_the_real_api_server(
        cluster: ControlPlane, keeper: AccountSecrets, release: tuple[str, str, Path],
        make_namespace: Callable[..., str]) -> None:
    namespace, _, kubeconfig = release
    ca_secret = "ids-meshguard-mesh-ca"
    # A CA meshguard made, 5 days from expiry: past identity.ca_renew_before_days.
    stored = cluster.kubectl_json("get", "secret", ca_secret, "-n", namespace)
    cluster.apply([authority.write(authority.Authority(certs.generate_ca("meshguard mesh CA", days=5),
                                                       managed=True), stored)], "-n", namespace)
    old = authority.read(cluster.kubectl_json("get", "secret", ca_secret, "-n", namespace))
    assert old is not None
    rotating = SETTINGS.model_copy(update={"ca_renew_before_days": 10, "ca_propagation_minutes": 1,
                                           "lifetime_hours": 1})
    now = [dt.datetime.now(dt.UTC)]
    ca = MeshAuthority(api_client(kubeconfig), namespace, rotating, clock=lambda: now[0])
    # 1. A successor, written to the Secret for every replica, trusted but not signing yet.
    held = authority.read(cluster.kubectl_json("get", "secret", ca_secret, "-n", namespace))
    assert held is not None and held.next is not None and held.signing.cert == old.signing.cert
    new = held.next.cert
    assert ca.current.trusted == (old.signing.cert, new)
    mesh = make_namespace(MESH)
    uid = _account(cluster, mesh, "ledger")["metadata"]["uid"]
    issuer = AccountSecrets(api_client(kubeconfig), rotating, "cluster.local", ca)

    def issued() -> tuple[x509.Certificate, bytes]:
        issuer.ensure(mesh, "ledger", uid)
        made = _secret(cluster, mesh, "ledger")
        assert made is not None
        return _leaf(made), base64.b64decode(made["data"]["ca.crt"])

    leaf, bundle = issued()
    leaf.verify_directly_issued_by(old.signing.cert)
    assert bundle == ca.current.bundle_pem() and new.public_bytes(serialization.Encoding.PEM) in bundle
    # 2. Once it has had time to reach every proxy, it signs; the old one is still trusted.
    now[0] += dt.timedelta(minutes=2)
    ca.refresh()
    assert ca.current.signing.cert == new and ca.current.trusted == (new, old.signing.cert)
    leaf, bundle = issued()
    leaf.verify_directly_issued_by(new)
    assert bundle == ca.current.bundle_pem()
    # Another replica reading the Secret with the real clock agrees.
    assert MeshAuthority(api_client(kubeconfig), namespace, rotating).current.trusted == ca.current.trusted
    # 3. A certificate lifetime later, the old CA is trusted no more, in the Secret and in every account's Secret.
    now[0] += dt.timedelta(hours=2)
    ca.refresh()
    assert ca.current.trusted == (new,)
    assert issued()[1] == new.public_bytes(serialization.Encoding.PEM)
    stored = cluster.kubectl_json("get", "secret", ca_secret, "-n", namespace)
    assert "previous.crt" not in stored["data"] and "next.crt" not in stored["data"]

"""The Secret per ServiceAccount (webhook/identity/accounts.py): what it holds, and what makes meshguard issue it
again — judged from the certificate, never from what a tenant can write beside it."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import pytest
from cryptography import x509

from webhook import certs
from webhook.identity.accounts import LABEL, reissue_reason, secret
from webhook.identity.authority import Authority
from webhook.identity.settings import account_secret_name

CA = Authority(certs.generate_ca("test mesh CA"))
DAY = dt.timedelta(hours=24)
UID = "4c1d6a52-0000-4000-8000-000000000001"


def _fresh(namespace: str = "shop", account: str = "web") -> dict[str, Any]:
    return secret(CA, "cluster.local", namespace, account, UID, DAY)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_the_secret_holds_a_certificate_of_the_account_owned_by_it() -> None:
    made = _fresh()
    assert made["type"] == "kubernetes.io/tls"
    meta = made["metadata"]
    assert (meta["name"], meta["namespace"]) == ("meshguard-identity-web", "shop") and LABEL in meta["labels"]
    assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "ServiceAccount", "name": "web", "uid": UID}]
    leaf = x509.load_pem_x509_certificate(base64.b64decode(made["data"]["tls.crt"]))
    leaf.verify_directly_issued_by(CA.signing.cert)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["spiffe://cluster.local/ns/shop/sa/web"]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == DAY + dt.timedelta(minutes=5)  # backdated
    assert base64.b64decode(made["data"]["ca.crt"]) == CA.bundle_pem() == CA.signing.cert_pem()
    assert reissue_reason(made, CA, "cluster.local", "web", UID, _now()) is None


def test_it_is_issued_again_from_half_life_on() -> None:
    made = _fresh()
    leaf = x509.load_pem_x509_certificate(base64.b64decode(made["data"]["tls.crt"]))
    half = leaf.not_valid_before_utc + (leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2
    assert reissue_reason(made, CA, "cluster.local", "web", UID, half - dt.timedelta(seconds=1)) is None
    assert reissue_reason(made, CA, "cluster.local", "web", UID, half) == "past half-life"


def _edited(**data: bytes) -> dict[str, Any]:
    made = _fresh()
    made["data"].update({k.replace("_", "."): base64.b64encode(v).decode() for k, v in data.items()})
    return made


OTHER_CA = certs.generate_ca("a tenant's own CA")


@pytest.mark.parametrize(("case", "reason"), [
    # A tenant who can write Secrets in its namespace puts in a certificate of its own CA...
    (lambda: _edited(tls_crt=certs.issue_workload(OTHER_CA, "shop", "web").cert_pem()), "not issued by the mesh CA"),
    # ...or a trust bundle that also trusts it,
    (lambda: _edited(ca_crt=CA.bundle_pem() + OTHER_CA.cert_pem()), "its trust bundle is not the mesh CA's"),
    # or another account's certificate (from a Secret it can read),
    (lambda: _edited(tls_crt=certs.issue_workload(CA.signing, "shop", "admin").cert_pem()), "names another identity"),
    (lambda: _edited(tls_crt=certs.issue_workload(CA.signing, "billing", "web").cert_pem()),
     "names another identity"),
    # or a key that is not the certificate's,
    (lambda: _edited(tls_key=certs.issue_workload(CA.signing, "shop", "web").key_pem()),
     "its key is not the certificate's"),
    (lambda: _edited(tls_crt=b"not a certificate"), "no readable certificate and key"),
    (lambda: {**_fresh(), "data": None}, "no readable certificate and key"),
], ids=["foreign-ca", "extra-trust", "other-account", "other-namespace", "other-key", "garbage", "empty"])
def test_what_a_tenant_can_write_into_it_is_issued_again(case: Any, reason: str) -> None:
    assert reissue_reason(case(), CA, "cluster.local", "web", UID, _now()) == reason


def test_a_secret_of_an_account_deleted_and_made_again_is_issued_again() -> None:
    # Same name, new account: the old certificate was the old account's, and the Secret is owned by it.
    assert reissue_reason(_fresh(), CA, "cluster.local", "web", "another-uid", _now()) == \
        "not owned by the ServiceAccount"


def test_names_fit_a_secret_whatever_the_account_is_called() -> None:
    assert account_secret_name("web") == "meshguard-identity-web"
    long = "a" * 240 + ".b" * 6
    name = account_secret_name(long)
    assert len(name) <= 253 and name.startswith("meshguard-identity-aaa")
    assert account_secret_name(long) == name != account_secret_name("a" * 240 + ".c" * 6)

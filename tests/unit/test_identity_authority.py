"""The mesh CA's rotation (webhook/identity/authority.py): at every moment each proxy trusts whatever signed the
certificates its peers present — a successor is trusted before it signs, and its predecessor stays trusted until
what it signed has expired."""

from __future__ import annotations

import base64
import datetime as dt

import pytest

from webhook import certs
from webhook.identity.authority import (
    MANAGED,
    Authority,
    AuthorityError,
    Timing,
    expiring,
    generate,
    read,
    step,
    write,
)

TIMING = Timing(validity=dt.timedelta(days=365), renew_before=dt.timedelta(days=10),
                propagation=dt.timedelta(hours=1), lifetime=dt.timedelta(hours=24))
EMPTY = {"metadata": {"name": "meshguard-mesh-ca", "annotations": {"helm.sh/resource-policy": "keep"}}}


def _through_secret(authority: Authority) -> Authority:
    held = read(write(authority, EMPTY))
    assert held is not None
    return held


def test_a_rotation_trusts_the_successor_before_it_signs_and_the_predecessor_until_its_leaves_expire() -> None:
    start = _through_secret(generate(30))
    old = start.signing.cert
    ends = old.not_valid_after_utc
    assert step(start, ends - dt.timedelta(days=11), TIMING) is None  # not due yet
    # 1. Ten days before expiry: a successor, trusted by every proxy from now on, not signing yet.
    now = ends - dt.timedelta(days=10)
    brought, what = step(start, now, TIMING) or pytest.fail("no rotation")
    brought = _through_secret(brought)
    assert "trusted" in what and brought.signing.cert == old and brought.next is not None
    new = brought.next.cert
    assert brought.trusted == (old, new)
    assert step(brought, now + dt.timedelta(minutes=59), TIMING) is None  # still reaching the proxies
    # 2. Once every proxy has had time to receive it, it signs; the old one stays trusted.
    switched, what = step(brought, now + TIMING.propagation, TIMING) or pytest.fail("no switch")
    switched = _through_secret(switched)
    assert "signs" in what and switched.signing.cert == new and switched.trusted == (new, old)
    until = switched.previous_trusted_until
    assert until is not None and until >= now + TIMING.propagation + TIMING.lifetime
    assert step(switched, until - dt.timedelta(seconds=1), TIMING) is None
    # 3. When every certificate the old CA signed has expired, only the new one is trusted.
    done, _ = step(switched, until, TIMING) or pytest.fail("old CA kept")
    assert _through_secret(done).trusted == (new,) and done.managed
    assert not expiring(done, until, TIMING) and step(done, until, TIMING) is None


def test_a_ca_of_the_platforms_own_is_only_warned_about_until_it_brings_a_successor() -> None:
    own = Authority(certs.generate_ca("platform intermediate", days=30))
    near = own.signing.cert.not_valid_after_utc - dt.timedelta(days=5)
    assert step(own, near, TIMING) is None and expiring(own, near, TIMING)
    # The platform puts the successor in next.crt/next.key: from then on, the same overlap.
    secret = write(own, EMPTY)
    successor = certs.generate_ca("platform intermediate 2", days=365)
    secret["data"] |= {"next.crt": base64.b64encode(successor.cert_pem()).decode(),
                       "next.key": base64.b64encode(successor.key_pem()).decode()}
    handed = read(secret)
    assert handed is not None and not expiring(handed, near, TIMING)
    timed, _ = step(handed, near, TIMING) or pytest.fail("successor ignored")
    assert timed.next_signs_from == near + TIMING.propagation and MANAGED not in write(timed, EMPTY)["metadata"][
        "annotations"]
    switched, _ = step(timed, near + TIMING.propagation, TIMING) or pytest.fail("no switch")
    assert switched.signing.cert == successor.cert and switched.trusted == (successor.cert, own.signing.cert)


def test_what_the_secret_holds_must_be_a_usable_ca() -> None:
    assert read(EMPTY) is None  # the chart's empty Secret: to be filled in
    secret = write(generate(30), EMPTY)
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # other metadata kept
    other = certs.generate_ca("another")
    mismatched = {**secret, "data": {**secret["data"], "ca.key": base64.b64encode(other.key_pem()).decode()}}
    with pytest.raises(AuthorityError, match="ca.key is not the key of ca.crt"):
        read(mismatched)
    with pytest.raises(AuthorityError, match="no usable CA"):
        read({**secret, "data": {"ca.crt": "bm90IGEgY2VydA=="}})

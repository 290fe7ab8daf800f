"""``meshguard netinit`` against the real iptables of a fresh network namespace."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.dataplane.conftest import Host, Lab

pytestmark = pytest.mark.dataplane

ARGS = ["netinit", "--proxy-uid", "1337", "--inbound-port", "15006", "--outbound-port", "15001",
        "--exclude-inbound-ports", "15021,15090"]


def _rules(pod: Host, save: str) -> list[str]:
    output = pod.run(save, "-t", "nat").stdout
    return [line for line in output.splitlines() if line.startswith(("-A", ":MESHGUARD"))]


def _netinit(pod: Host, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return pod.run(*extra, sys.executable, "-m", "webhook", *ARGS, check=check)


def test_rules_match_the_dry_run_and_a_second_run_changes_nothing(lab: Lab) -> None:
    pod = Host(lab, "pod", lab.netns("pod"))
    dry = pod.run(sys.executable, "-m", "webhook", *ARGS, "--dry-run").stdout
    _netinit(pod)
    first = {save: _rules(pod, save) for save in ("iptables-save", "ip6tables-save")}
    for save, rules in first.items():
        assert "-A OUTPUT -p tcp -j MESHGUARD_OUTPUT" in rules, save
        # Everything installed is what the dry run printed (iptables-save orders rules by chain).
        assert set(rules) <= set(dry.splitlines()), save
    assert "TCP traffic now goes through ports 15006/15001" in _netinit(pod).stdout
    assert {save: _rules(pod, save) for save in first} == first


def test_without_net_admin_it_fails_with_the_fix(lab: Lab) -> None:
    pod = Host(lab, "pod", lab.netns("pod"))
    result = _netinit(pod, "setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--", check=False)
    assert result.returncode == 1
    assert "needs the NET_ADMIN and NET_RAW capabilities" in result.stderr
    assert "Traceback" not in result.stderr
    assert _rules(pod, "iptables-save") == []

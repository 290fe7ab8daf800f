"""``meshguard netinit``: the iptables-restore input it builds from the injector's flags, and its errors."""

from __future__ import annotations

import ipaddress

import pytest

from webhook import netinit
from webhook.cli import main
from webhook.netinit import CaptureOptions, NetinitError

INJECTOR_ARGS = ["netinit", "--proxy-uid", "1337", "--inbound-port", "15006", "--outbound-port", "15001",
                 "--exclude-inbound-ports", "15021,15090"]

EXPECTED_V4 = """\
*nat
:MESHGUARD_INBOUND - [0:0]
:MESHGUARD_IN_REDIRECT - [0:0]
:MESHGUARD_OUTPUT - [0:0]
:MESHGUARD_REDIRECT - [0:0]
-A MESHGUARD_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A MESHGUARD_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A MESHGUARD_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A MESHGUARD_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A MESHGUARD_INBOUND -p tcp -j MESHGUARD_IN_REDIRECT
-A MESHGUARD_OUTPUT -o lo -j RETURN
-A MESHGUARD_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MESHGUARD_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN
-A MESHGUARD_OUTPUT -d 169.254.169.254/32 -j RETURN
-A MESHGUARD_OUTPUT -j MESHGUARD_REDIRECT
-A PREROUTING -p tcp -j MESHGUARD_INBOUND
-A OUTPUT -p tcp -j MESHGUARD_OUTPUT
COMMIT
"""


def _dry_run(capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert main([*INJECTOR_ARGS, *extra, "--dry-run"]) == 0
    return capsys.readouterr().out


def _sections(output: str) -> dict[str, str]:
    """The dry-run output split by its ``# <tool> --noflush`` headers."""
    sections: dict[str, str] = {}
    for block in output.split("# ")[1:]:
        header, _, body = block.partition("\n")
        sections[header] = body
    return sections


def test_dry_run_prints_the_restore_input_of_both_families(capsys: pytest.CaptureFixture[str]) -> None:
    output = _dry_run(capsys, "--exclude-outbound-ports", "5432",
                      "--exclude-outbound-ip-ranges", "169.254.169.254,fd00::/8")
    sections = _sections(output)
    assert list(sections) == ["iptables-restore --noflush", "ip6tables-restore --noflush"]
    assert sections["iptables-restore --noflush"] == EXPECTED_V4
    # Same chains for IPv6, with the IPv6 exclusion in place of the IPv4 one.
    assert sections["ip6tables-restore --noflush"] == EXPECTED_V4.replace("169.254.169.254/32", "fd00::/8")


def test_envoys_own_traffic_and_loopback_leave_before_any_redirect(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _dry_run(capsys).splitlines()
    output_rules = [line for line in lines[: lines.index("COMMIT")] if line.startswith("-A MESHGUARD_OUTPUT")]
    assert output_rules.index("-A MESHGUARD_OUTPUT -o lo -j RETURN") < len(output_rules) - 1
    assert output_rules.index("-A MESHGUARD_OUTPUT -m owner --uid-owner 1337 -j RETURN") < len(output_rules) - 1
    assert output_rules[-1] == "-A MESHGUARD_OUTPUT -j MESHGUARD_REDIRECT"


def test_include_ranges_capture_only_those_destinations_per_family(capsys: pytest.CaptureFixture[str]) -> None:
    sections = _sections(_dry_run(capsys, "--include-outbound-ip-ranges", "10.213.0.0/16,10.96.0.0/12,fd00::/64",
                                  "--exclude-outbound-ip-ranges", "10.213.9.0/24"))
    v4 = sections["iptables-restore --noflush"].splitlines()
    assert "-A MESHGUARD_OUTPUT -j MESHGUARD_REDIRECT" not in v4
    exclude = v4.index("-A MESHGUARD_OUTPUT -d 10.213.9.0/24 -j RETURN")
    assert v4[exclude + 1: exclude + 3] == ["-A MESHGUARD_OUTPUT -d 10.213.0.0/16 -j MESHGUARD_REDIRECT",
                                           "-A MESHGUARD_OUTPUT -d 10.96.0.0/12 -j MESHGUARD_REDIRECT"]
    v6 = sections["ip6tables-restore --noflush"]
    assert "-A MESHGUARD_OUTPUT -d fd00::/64 -j MESHGUARD_REDIRECT" in v6 and "10.213" not in v6


def test_star_captures_everything_and_must_stand_alone(capsys: pytest.CaptureFixture[str]) -> None:
    assert "-A MESHGUARD_OUTPUT -j MESHGUARD_REDIRECT" in _dry_run(capsys, "--include-outbound-ip-ranges", "*")
    assert main([*INJECTOR_ARGS, "--include-outbound-ip-ranges", "*,10.0.0.0/8", "--dry-run"]) == 2
    assert "'*' already means every destination" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--exclude-inbound-ports", "15021,http"], "--exclude-inbound-ports: 'http' is not a TCP port"),
        (["--exclude-outbound-ports", "70000"], "--exclude-outbound-ports: '70000' is not a TCP port"),
        (["--exclude-outbound-ports", "\u00b2"], "--exclude-outbound-ports: '\u00b2' is not a TCP port"),  # isdigit()
        (["--exclude-outbound-ip-ranges", "10.0.0.0/40"], "--exclude-outbound-ip-ranges: '10.0.0.0/40' is not an IP"),
        (["--inbound-port", "0"], "--inbound-port: 0 is not a TCP port"),
        (["--outbound-port", "15006"], "--inbound-port and --outbound-port must differ"),
        (["--proxy-uid", "-1"], "--proxy-uid: -1 is not a uid"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    assert main([*INJECTOR_ARGS, *flags, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_rerun_deletes_its_previous_jumps_in_the_same_transaction() -> None:
    options = CaptureOptions(proxy_uid=1337, inbound_port=15006, outbound_port=15001)
    saved = "*nat\n:PREROUTING ACCEPT [0:0]\n" + "\n".join(netinit.JUMPS) + "\nCOMMIT\n"
    lines = netinit.restore_input(options, 4, saved).splitlines()
    assert lines[1:3] == ["-D PREROUTING -p tcp -j MESHGUARD_INBOUND", "-D OUTPUT -p tcp -j MESHGUARD_OUTPUT"]
    assert lines[-3:] == [*netinit.JUMPS, "COMMIT"]
    assert not any(line.startswith("-D") for line in netinit.restore_input(options, 4, "*nat\nCOMMIT\n").splitlines())


def test_parsing_keeps_order_and_drops_duplicates() -> None:
    assert netinit.parse_ports(" 15021, 15090,15021", "--x") == (15021, 15090)
    # One comma-list parser for flags and annotations alike: an empty item is a typo, named with its flag.
    with pytest.raises(netinit.NetinitError, match="--x: .* has an empty item"):
        netinit.parse_ports("15021,", "--x")
    assert netinit.parse_ranges("10.1.2.3/8,10.0.0.0/8,::1", "--x") == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert netinit.parse_include_ranges("", "--x") == ()
    assert netinit.parse_include_ranges(" * ", "--x") is None


@pytest.mark.parametrize(
    "stderr",
    [
        "iptables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must "
        "be root)",
        "iptables-restore: unable to initialize table 'nat'\nError occurred at line: 1\nOperation not permitted",
        "can't initialize iptables table `nat': Permission denied (you must be root)",
    ],
)
def test_a_missing_net_admin_is_named_with_the_fix(stderr: str) -> None:
    message = netinit.explain_failure("iptables-restore", stderr)
    assert "needs the NET_ADMIN and NET_RAW capabilities" in message
    assert "\n" not in message


def test_other_failures_are_passed_on_in_one_line() -> None:
    message = netinit.explain_failure("iptables-restore", "iptables-restore: line 7 failed\n")
    assert message == "iptables-restore failed: iptables-restore: line 7 failed"


def test_a_missing_tool_is_reported_not_raised() -> None:
    def runner(argv: list[str], **_: object) -> object:
        raise FileNotFoundError(argv[0])

    options = CaptureOptions(proxy_uid=1337, inbound_port=15006, outbound_port=15001)
    with pytest.raises(NetinitError, match="iptables-save is not installed in the init image"):
        netinit.apply(options, (4,), runner=runner)  # type: ignore[arg-type]

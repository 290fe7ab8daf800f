"""``meshguard netinit``: the init container's iptables rules that send a pod's TCP traffic through its sidecar.

Same shape as Istio's istio-iptables, in the nat table of the pod's network namespace:

* ``PREROUTING`` -> ``MESHGUARD_INBOUND``: every inbound TCP connection is redirected to Envoy's inbound port,
  except to the excluded ports (the proxy's readiness and stats ports, and whatever the pod opts out).
* ``OUTPUT`` -> ``MESHGUARD_OUTPUT``: outbound TCP from the app is redirected to Envoy's outbound port, except
  loopback traffic (which covers Envoy's forwarding to ``127.0.0.1:<port>`` and a pod calling itself), Envoy's own
  connections (by its uid: without this every proxied connection would be captured again, forever), excluded
  ports and excluded ranges; when include ranges are given instead of ``*``, only those are captured.

Building the rules is pure (:func:`restore_input`); :func:`apply` feeds them to ``iptables-restore`` and
``ip6tables-restore`` in one transaction per family, so a pod never runs with half its rules.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import MeshguardError
from .lists import port_number, split_list

INBOUND_CHAIN = "MESHGUARD_INBOUND"
IN_REDIRECT_CHAIN = "MESHGUARD_IN_REDIRECT"
OUTPUT_CHAIN = "MESHGUARD_OUTPUT"
REDIRECT_CHAIN = "MESHGUARD_REDIRECT"
CHAINS = (INBOUND_CHAIN, IN_REDIRECT_CHAIN, OUTPUT_CHAIN, REDIRECT_CHAIN)
# The jumps from the built-in chains into ours: the only rules outside our own chains.
JUMPS = (f"-A PREROUTING -p tcp -j {INBOUND_CHAIN}", f"-A OUTPUT -p tcp -j {OUTPUT_CHAIN}")
ALL_RANGES = "*"
# The flag naming the ports left uncaptured; the control plane reads it back from injected pods.
EXCLUDE_INBOUND_FLAG = "--exclude-inbound-ports"
# The proxy's bootstrap options that are also netinit's own flags (its capture ports, the SDS files' directories):
# with --bootstrap-out, netinit takes the other options as the bootstrap command's flags.
SHARED_OPTIONS = frozenset({"inbound_port", "outbound_port", "cert_dir", "sds_dir"})
RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}
SAVE = {4: "iptables-save", 6: "ip6tables-save"}
# What iptables-restore says when the container lacks NET_ADMIN (legacy and nf_tables backends).
_PERMISSION_MARKERS = ("permission denied", "operation not permitted", "you must be root")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetinitError(MeshguardError):
    """A reason the rules could not be built or applied, worded for the pod's events and logs."""


@dataclass(frozen=True)
class CaptureOptions:
    """The ``meshguard netinit`` flags, parsed."""

    proxy_uid: int
    inbound_port: int
    outbound_port: int
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    # None captures every destination (the flag's ``*``); a tuple captures only those ranges.
    include_outbound_ip_ranges: tuple[Network, ...] | None = None
    exclude_outbound_ip_ranges: tuple[Network, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.proxy_uid < 2**32:
            raise NetinitError(f"--proxy-uid: {self.proxy_uid} is not a uid")
        for flag, port in (("--inbound-port", self.inbound_port), ("--outbound-port", self.outbound_port)):
            if not 1 <= port <= 65535:
                raise NetinitError(f"{flag}: {port} is not a TCP port (1-65535)")
        if self.inbound_port == self.outbound_port:
            raise NetinitError("--inbound-port and --outbound-port must differ")


# --- parsing the comma-separated flag values ---------------------------------------------------------------------


def _items(value: str, flag: str) -> list[str]:
    try:
        return split_list(value)
    except ValueError as exc:
        raise NetinitError(f"{flag}: {exc}") from None


def parse_ports(value: str, flag: str) -> tuple[int, ...]:
    """``"15021,15090"`` -> ``(15021, 15090)``, duplicates dropped, order kept."""
    ports: dict[int, None] = {}
    for item in _items(value, flag):
        port = port_number(item)
        if port is None:
            raise NetinitError(f"{flag}: {item!r} is not a TCP port (1-65535)")
        ports[port] = None
    return tuple(ports)


def parse_ranges(value: str, flag: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8,fd00::/8"`` -> networks; a bare address means that one host."""
    networks: dict[Network, None] = {}
    for item in _items(value, flag):
        try:
            networks[ipaddress.ip_network(item, strict=False)] = None
        except ValueError:
            raise NetinitError(f"{flag}: {item!r} is not an IP range such as 10.0.0.0/8 or fd00::/8") from None
    return tuple(networks)


def parse_include_ranges(value: str, flag: str) -> tuple[Network, ...] | None:
    """Like :func:`parse_ranges`, except that ``*`` (alone) means every destination (None)."""
    items = _items(value, flag)
    if ALL_RANGES in items:
        if len(items) > 1:
            raise NetinitError(f"{flag}: '*' already means every destination; give it alone")
        return None
    return parse_ranges(value, flag)


# --- building the rules (pure) -----------------------------------------------------------------------------------


def _return_port(chain: str, port: int) -> str:
    return f"-A {chain} -p tcp -m tcp --dport {port} -j RETURN"


def _of_family(networks: Iterable[Network], family: int) -> list[Network]:
    return [n for n in networks if n.version == family]


def rules(options: CaptureOptions, family: int) -> list[str]:
    """The nat-table rules of one IP family (4 or 6), as ``iptables-restore`` lines without the table framing."""
    lines = [f":{chain} - [0:0]" for chain in CHAINS]
    lines += [
        f"-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {options.inbound_port}",
        f"-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {options.outbound_port}",
    ]
    lines += [_return_port(INBOUND_CHAIN, port) for port in options.exclude_inbound_ports]
    lines.append(f"-A {INBOUND_CHAIN} -p tcp -j {IN_REDIRECT_CHAIN}")
    lines += [
        f"-A {OUTPUT_CHAIN} -o lo -j RETURN",
        f"-A {OUTPUT_CHAIN} -m owner --uid-owner {options.proxy_uid} -j RETURN",
    ]
    lines += [_return_port(OUTPUT_CHAIN, port) for port in options.exclude_outbound_ports]
    lines += [
        f"-A {OUTPUT_CHAIN} -d {network} -j RETURN"
        for network in _of_family(options.exclude_outbound_ip_ranges, family)
    ]
    if options.include_outbound_ip_ranges is None:
        lines.append(f"-A {OUTPUT_CHAIN} -j {REDIRECT_CHAIN}")
    else:
        lines += [
            f"-A {OUTPUT_CHAIN} -d {network} -j {REDIRECT_CHAIN}"
            for network in _of_family(options.include_outbound_ip_ranges, family)
        ]
    lines += list(JUMPS)
    return lines


def restore_input(options: CaptureOptions, family: int, current: str = "") -> str:
    """The complete ``iptables-restore --noflush`` input for one family.

    ``current`` is the ``iptables-save -t nat`` output of the namespace: when our jumps are already there (the
    init container ran before in this pod), they are deleted in the same transaction, so running twice leaves
    the same rules as running once. Declaring our chains flushes them.
    """
    present = set(current.splitlines())
    deletes = ["-D" + jump[2:] for jump in JUMPS if jump in present]
    return "\n".join(["*nat", *deletes, *rules(options, family), "COMMIT", ""])


# --- applying them -----------------------------------------------------------------------------------------------

Runner = Callable[..., subprocess.CompletedProcess[str]]


def ipv6_available() -> bool:
    """Whether the kernel has IPv6 at all (booted with ``ipv6.disable=1`` it has not, and ip6tables fails)."""
    return os.path.exists("/proc/net/if_inet6")


def _run(runner: Runner, argv: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    try:
        return runner(argv, input=stdin, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise NetinitError(f"{argv[0]} is not installed in the init image (package iptables)") from None
    except subprocess.TimeoutExpired:
        raise NetinitError(f"{argv[0]} did not finish within 60s") from None


def explain_failure(tool: str, stderr: str) -> str:
    """One line saying what went wrong; a missing NET_ADMIN capability is named as such, with the fix."""
    detail = " ".join(stderr.split()) or "no output"
    if any(marker in detail.lower() for marker in _PERMISSION_MARKERS):
        return (
            f"{tool}: not permitted to manage the iptables rules of the pod network; the init container needs "
            f"the NET_ADMIN and NET_RAW capabilities and to run as root ({detail})"
        )
    return f"{tool} failed: {detail}"


def apply(options: CaptureOptions, families: Iterable[int], runner: Runner = subprocess.run) -> None:
    """Install the rules of each family atomically (one ``*-restore`` call each); raise :class:`NetinitError`."""
    for family in families:
        saved = _run(runner, [SAVE[family], "-t", "nat"])
        if saved.returncode != 0:
            raise NetinitError(explain_failure(SAVE[family], saved.stderr))
        text = restore_input(options, family, saved.stdout)
        restored = _run(runner, [RESTORE[family], "--noflush"], text)
        if restored.returncode != 0:
            raise NetinitError(explain_failure(RESTORE[family], restored.stderr))


def families() -> tuple[int, ...]:
    return (4, 6) if ipv6_available() else (4,)


def dry_run(options: CaptureOptions) -> str:
    """What :func:`apply` would feed each ``*-restore`` on an empty namespace, with a comment naming the tool."""
    return "".join(f"# {RESTORE[f]} --noflush\n{restore_input(options, f)}" for f in (4, 6))

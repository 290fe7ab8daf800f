"""Parsers for the values injection accepts, shared by the config file and the per-pod annotations.

Each raises ``ValueError`` on a bad value, so a typo fails at startup (config) or rejects the one pod
(annotation) instead of producing a pod spec that the API server or the kubelet refuses later.
"""

from __future__ import annotations

import ipaddress
import re
from decimal import Decimal
from typing import Literal, get_args

EnvoyLogLevel = Literal["trace", "debug", "info", "warning", "error", "critical", "off"]
LOG_LEVELS: tuple[str, ...] = get_args(EnvoyLogLevel)

_QUANTITY = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?"
)
_SCALE = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"), "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
}
# A container image reference: [registry[:port]/]path[:tag][@digest].
_IMAGE = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@[a-z0-9]+(?:[+._-][a-z0-9]+)*:[0-9a-fA-F]{32,})?"
)
_PORT = re.compile(r"[0-9]{1,5}")


def parse_quantity(text: str) -> Decimal:
    """A non-negative Kubernetes resource quantity (``100m``, ``0.5``, ``128Mi``, ``1e3``) as a Decimal."""
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    suffix = match["suffix"] or ""
    if suffix[:1] in ("e", "E"):
        return Decimal(match["number"]) * Decimal(10) ** int(suffix[1:])
    return Decimal(match["number"]) * _SCALE[suffix]


def quantity(text: str) -> str:
    parse_quantity(text)
    return text


def image(text: str) -> str:
    if _IMAGE.fullmatch(text) is None:
        raise ValueError(f"{text!r} is not an image reference")
    return text


def log_level(text: str) -> str:
    if text not in LOG_LEVELS:
        raise ValueError(f"{text!r} is not an Envoy log level")
    return text


def port(value: int | str) -> int:
    if isinstance(value, str) and _PORT.fullmatch(value.strip()) is None:
        raise ValueError(f"{value!r} is not a port number")
    number = int(value)
    if not 1 <= number <= 65535:
        raise ValueError(f"{value!r} is not a port number 1-65535")
    return number


def cidr(text: str) -> str:
    """An IPv4 or IPv6 network, normalised (``10.1.2.3/8`` -> ``10.0.0.0/8``: the form iptables prints)."""
    return str(ipaddress.ip_network(text.strip(), strict=False))


def include_range(text: str) -> str:
    """A CIDR, or ``*`` for every destination."""
    return "*" if text.strip() == "*" else cidr(text)


def boolean(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError(f"{text!r} is not true or false")
    return text == "true"



"""The per-pod override annotations: their names, the setting each one overrides, and the parser of its value.

Apart from :mod:`webhook.injection.overrides` (which applies them) so that the configuration can name them too
(``injection.allowed_overrides``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..lists import split_list
from . import values

PREFIX = "meshguard.io/"
# Exceptions, not ranges: each meshed pod's uncaptured ports go into every proxy's outbound listener.
MAX_LISTED_PORTS = 32


def port_list(text: str) -> tuple[int, ...]:
    """The ports of an exclude-inbound-ports or exclude-outbound-ports annotation; ``ValueError`` if invalid."""
    ports = tuple(values.port(item) for item in split_list(text))
    if len(set(ports)) > MAX_LISTED_PORTS:
        raise ValueError(f"more than {MAX_LISTED_PORTS} ports")
    return ports


def _cidrs(text: str) -> tuple[str, ...]:
    return tuple(values.cidr(item) for item in split_list(text))


def _include_ranges(text: str) -> tuple[str, ...]:
    ranges = tuple(values.include_range(item) for item in split_list(text))
    if not ranges:
        raise ValueError("at least one range is required")
    return ranges


# annotation (without the prefix) -> (settings field, parser, accepted format for the error message)
OVERRIDES: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "proxy-cpu": ("proxy_cpu", values.quantity, "a CPU quantity such as 100m, 0.5 or 2"),
    "proxy-memory": ("proxy_memory", values.quantity, "a memory quantity such as 128Mi, 1Gi or 500M"),
    "proxy-cpu-limit": ("proxy_cpu_limit", values.quantity, "a CPU quantity such as 500m or 2"),
    "proxy-memory-limit": ("proxy_memory_limit", values.quantity, "a memory quantity such as 512Mi or 1Gi"),
    "proxy-image": ("proxy_image", values.image, "an image reference such as envoyproxy/envoy:v1.40.0"),
    "log-level": ("log_level", values.log_level, "one of " + ", ".join(values.LOG_LEVELS)),
    "exclude-inbound-ports": ("exclude_inbound_ports", port_list,
                              f"up to {MAX_LISTED_PORTS} comma-separated ports 1-65535, e.g. 8081,9090"),
    "exclude-outbound-ports": ("exclude_outbound_ports", port_list,
                               f"up to {MAX_LISTED_PORTS} comma-separated ports 1-65535, e.g. 5432,6379"),
    "include-outbound-ip-ranges": (
        "include_outbound_ip_ranges", _include_ranges, "* or comma-separated CIDRs, e.g. 10.0.0.0/8,172.16.0.0/12"),
    "exclude-outbound-ip-ranges": (
        "exclude_outbound_ip_ranges", _cidrs, "comma-separated CIDRs, e.g. 169.254.169.254/32"),
    "native-sidecar": ("native_sidecar", values.boolean, '"true" or "false"'),
    "hold-application-until-proxy-starts": ("hold_application_until_proxy_starts", values.boolean,
                                            '"true" or "false"'),
    "rewrite-app-probes": ("rewrite_app_probes", values.boolean, '"true" or "false"'),
}
ANNOTATIONS = tuple(PREFIX + name for name in OVERRIDES)
# What a pod can set with them that changes what protects its traffic: its proxy's image (any image, any
# behaviour). The platform lets pods use the others by default (injection.allowed_overrides).
PLATFORM_ONLY = ("proxy-image",)
TENANT_OVERRIDES = tuple(name for name in OVERRIDES if name not in PLATFORM_ONLY)

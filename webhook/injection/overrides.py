"""Per-pod override annotations: parse and validate each one, and apply them on top of the configured defaults.

Every value is checked before anything is injected, so that a typo never produces a pod the API server or the
kubelet rejects later with a message about a container the user did not write. An invalid annotation rejects
the pod with a sentence naming the annotation and the format it accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import MeshguardError
from ..lists import split_list
from . import values
from .settings import InjectionSettings, resource_problem

PREFIX = "meshguard.io/"


class OverrideError(MeshguardError, ValueError):
    """One or more override annotations are invalid; ``problems`` holds one sentence per annotation."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def port_list(text: str) -> tuple[int, ...]:
    """The ports of an exclude-inbound-ports or exclude-outbound-ports annotation; ``ValueError`` if invalid."""
    return tuple(values.port(item) for item in split_list(text))


def _cidrs(text: str) -> tuple[str, ...]:
    return tuple(values.cidr(item) for item in split_list(text))


def _include_ranges(text: str) -> tuple[str, ...]:
    ranges = tuple(values.include_range(item) for item in split_list(text))
    if not ranges:
        raise ValueError("at least one range is required")
    return ranges


# annotation (without the prefix) -> (settings field, parser, accepted format for the error message)
_OVERRIDES: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "proxy-cpu": ("proxy_cpu", values.quantity, "a CPU quantity such as 100m, 0.5 or 2"),
    "proxy-memory": ("proxy_memory", values.quantity, "a memory quantity such as 128Mi, 1Gi or 500M"),
    "proxy-cpu-limit": ("proxy_cpu_limit", values.quantity, "a CPU quantity such as 500m or 2"),
    "proxy-memory-limit": ("proxy_memory_limit", values.quantity, "a memory quantity such as 512Mi or 1Gi"),
    "proxy-image": ("proxy_image", values.image, "an image reference such as envoyproxy/envoy:v1.40.0"),
    "log-level": ("log_level", values.log_level, "one of " + ", ".join(values.LOG_LEVELS)),
    "exclude-inbound-ports": ("exclude_inbound_ports", port_list, "comma-separated ports 1-65535, e.g. 8081,9090"),
    "exclude-outbound-ports": ("exclude_outbound_ports", port_list, "comma-separated ports 1-65535, e.g. 5432,6379"),
    "include-outbound-ip-ranges": (
        "include_outbound_ip_ranges", _include_ranges, "* or comma-separated CIDRs, e.g. 10.0.0.0/8,172.16.0.0/12"),
    "exclude-outbound-ip-ranges": (
        "exclude_outbound_ip_ranges", _cidrs, "comma-separated CIDRs, e.g. 169.254.169.254/32"),
    "native-sidecar": ("native_sidecar", values.boolean, '"true" or "false"'),
    "hold-application-until-proxy-starts": ("hold_application_until_proxy_starts", values.boolean,
                                            '"true" or "false"'),
    "rewrite-app-probes": ("rewrite_app_probes", values.boolean, '"true" or "false"'),
}
ANNOTATIONS = tuple(PREFIX + name for name in _OVERRIDES)


def apply_overrides(settings: InjectionSettings, annotations: Mapping[str, str]) -> InjectionSettings:
    """``settings`` with the pod's override annotations applied; raises :class:`OverrideError` listing every bad one.

    A pod without overrides (the common case) gets ``settings`` itself back, so caches keyed on it keep hitting.
    """
    if not any(key.startswith(PREFIX) for key in annotations):
        return settings  # the common case, on every pod creation: no meshguard annotation at all
    update: dict[str, Any] = {}
    problems: list[str] = []
    for name, (field, parse, accepted) in _OVERRIDES.items():
        raw = annotations.get(PREFIX + name)
        if raw is None:
            continue
        try:
            update[field] = parse(raw)
        except ValueError:
            problems.append(f'annotation {PREFIX}{name}: "{_clip(raw)}" is invalid; expected {accepted}')
    if problems:
        raise OverrideError(problems)
    if not update:
        return settings
    effective = settings.model_copy(update=update)
    problem = resource_problem(effective)
    if problem:
        message, request, limit = problem
        raise OverrideError([f"{message}; make annotation {_annotation(request)} <= {_annotation(limit)}"])
    return effective


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _annotation(field: str) -> str:
    return PREFIX + field.replace("_", "-")

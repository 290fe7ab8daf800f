"""What a tenant could write into a mesh pod to get around its proxy, judged from the pod spec alone.

A tenant edits its own workloads (their pod templates, its pods' images) and nothing else: not meshguard's
configuration, not namespace labels. Each check below is something such a tenant could write that leaves a pod
looking meshed while its traffic is not protected, and each is decided from the spec the API server is about to
store, which the tenant cannot make say something else:

* a container running as the proxy's uid: the redirect lets that uid's traffic through untouched, and it could
  take the proxy's ports;
* NET_ADMIN, NET_RAW, ALL or privileged in any container of the tenant (app, init or ephemeral): enough to
  rewrite the pod's iptables redirect;
* under STRICT, an exclude-inbound-ports annotation naming one of the pod's own ports: that port takes
  plaintext while the mTLS rule would say STRICT;
* meshguard's own containers not as meshguard's configuration makes them (image, command, arguments, ports,
  security context): a container merely named ``meshguard-proxy``, or an injected pod copied with an edited
  redirect. On an update, meshguard's containers may stay as they were (a pod injected before an upgrade keeps
  its proxy), but not change into anything else;
* with a static bootstrap, a proxy whose inbound modes (as injected, and as its arguments say) take plaintext
  while the PeerAuthentications now say STRICT.

Each problem says why the pod would run without effective mutual TLS, the fix, and the same why in a few words
for a warning (which the API server wants under 120 characters, the fix included).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .. import envoy
from ..injection.annotations import PREFIX, port_list
from ..injection.decision import INIT_NAME, PROXY_NAME
from ..injection.overrides import OverrideError, apply_overrides
from ..injection.patch import effective_settings
from ..injection.probes import splices_problem
from ..injection.settings import READINESS_PORT, InjectionSettings
from ..injection.spec import build, declared_inbound
from ..workloads import CONTAINER_LISTS, Workload
from .mtls import STRICT

MESHGUARD_CONTAINERS = (INIT_NAME, PROXY_NAME)
# Capabilities with which a container can change the pod's network stack, the redirect included.
NETWORK_CAPABILITIES = frozenset({"NET_ADMIN", "NET_RAW", "ALL"})
# What identifies one of meshguard's containers as the one the configuration makes.
COMPARED_FIELDS = ("image", "command", "args", "ports", "securityContext")
SPLICE_VARIABLES = frozenset(envoy.SPLICES.values())

Problem = tuple[str, str, str]  # (why, fix, the why in a few words)
EXCLUDE_INBOUND = PREFIX + "exclude-inbound-ports"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _containers(spec: Mapping[str, Any], lists: tuple[str, ...] = CONTAINER_LISTS) -> Iterator[Mapping[str, Any]]:
    for key in lists:
        items = spec.get(key)
        for container in items if isinstance(items, list) else ():
            if isinstance(container, Mapping):
                yield container


def _tenant_containers(spec: Mapping[str, Any], lists: tuple[str, ...]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for container in _containers(spec, lists):
        name = container.get("name")
        if name not in MESHGUARD_CONTAINERS:
            yield (name if isinstance(name, str) else "?"), container


def _capability(name: Any) -> str:
    text = name.upper() if isinstance(name, str) else ""
    return text.removeprefix("CAP_")


def tenant_problems(spec: Mapping[str, Any], proxy_uid: int,
                    lists: tuple[str, ...] = CONTAINER_LISTS) -> list[Problem]:
    """The proxy's uid and network capabilities in the tenant's containers of ``lists``."""
    problems: list[Problem] = []
    pod_uid = _mapping(spec.get("securityContext")).get("runAsUser")
    for name, container in _tenant_containers(spec, lists):
        security = _mapping(container.get("securityContext"))
        uid = security.get("runAsUser", pod_uid)
        if uid == proxy_uid:
            problems.append((f"container {name} runs as uid {proxy_uid}, the proxy's, whose traffic skips the proxy",
                             f"run it as another user than {proxy_uid}", f"{name} runs as the proxy's uid"))
        added = sorted({_capability(c) for c in _mapping(security.get("capabilities")).get("add") or ()
                        if isinstance(c, str)} & NETWORK_CAPABILITIES)
        if security.get("privileged") is True:
            added.insert(0, "privileged")
        if added:
            problems.append((f"container {name} has {', '.join(added)}, with which it could undo the traffic "
                             "redirect", f"drop {' and '.join(added)} from container {name}",
                             f"{name} has {', '.join(added)}"))
    return problems


def uncaptured_ports(workload: Workload) -> list[int]:
    """The pod's own declared ports that its exclude-inbound-ports annotation leaves out of the proxy."""
    raw = workload.annotations.get(EXCLUDE_INBOUND)
    if raw is None:
        return []
    try:
        excluded = set(port_list(raw))
    except ValueError:
        return []  # the injector refuses the pod with the annotation's format; nothing to add here
    declared = {port.get("containerPort") for _, c in _tenant_containers(workload.pod_spec, CONTAINER_LISTS)
                for port in c.get("ports") or () if isinstance(port, Mapping)}
    return sorted(p for p in excluded & declared if isinstance(p, int))


def plaintext_accepted(workload: Workload, settings: InjectionSettings) -> str | None:
    """With a static bootstrap, where the pod's proxy takes plaintext (its inbound modes as injected: a
    PeerAuthentication made STRICT since reaches it only when the pod is made again); None when nowhere."""
    if settings.xds_address is not None or PROXY_NAME not in _meshguard_containers(workload.pod_spec):
        return None
    mode, ports = declared_inbound(workload.pod_spec) or (settings.mtls_mode, {})
    weak = ([] if mode == STRICT else [f"{mode} on every port"]) + \
        [f"port {port} {port_mode}" for port, port_mode in sorted(ports.items()) if port_mode != STRICT]
    return ", ".join(weak) or None


def _meshguard_containers(spec: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c["name"]: c for c in _containers(spec) if c.get("name") in MESHGUARD_CONTAINERS}


def _compared(container: Mapping[str, Any]) -> dict[str, Any]:
    return {key: container.get(key) for key in COMPARED_FIELDS}


def _holds(wanted: Any, actual: Any) -> bool:
    """``actual`` says everything ``wanted`` says: the API server may add defaults to objects, never change
    what was set."""
    if isinstance(wanted, Mapping):
        return isinstance(actual, Mapping) and all(k in actual and _holds(v, actual[k]) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(actual, list) and len(actual) == len(wanted) and all(
            _holds(w, a) for w, a in zip(wanted, actual, strict=True))
    return bool(wanted == actual)


def override_problem(workload: Workload, settings: InjectionSettings) -> str | None:
    """Why the injector would refuse the pod's override annotations (invalid, or not allowed by the platform)."""
    try:
        apply_overrides(settings, workload.annotations)  # the part of effective_settings that can refuse
    except OverrideError as exc:
        return str(exc)
    return None


def sidecar_problems(workload: Workload, settings: InjectionSettings, old: Workload | None) -> list[Problem]:
    """meshguard's containers in ``workload`` that are not what its configuration (and the pod's override
    annotations) make; none when they are unchanged from ``old``."""
    present = _meshguard_containers(workload.pod_spec)
    if not present:
        return []
    if old is not None:
        before = _meshguard_containers(old.pod_spec)
        if {n: (_compared(c), c.get("env")) for n, c in before.items()} == \
                {n: (_compared(c), c.get("env")) for n, c in present.items()}:
            return []
    try:
        effective = effective_settings(workload, settings)
        expected = build(effective)
    except OverrideError as exc:
        return [(f"its meshguard annotations are invalid ({exc})", "fix them, then recreate the pods",
                 "invalid meshguard annotations")]
    made = {c["name"]: c for c in (*expected.init_containers, *expected.containers_front, *expected.containers_back)}
    fix = "remove meshguard's containers and let the injector add them"
    if PROXY_NAME in present and INIT_NAME not in present:
        return [(f"it has {PROXY_NAME} without {INIT_NAME}, so no traffic is redirected to it", fix,
                 f"{PROXY_NAME} without {INIT_NAME}")]
    for name, container in present.items():
        wanted = made.get(name)
        if wanted is None:
            return [(f"its {name} container is not one meshguard's configuration adds", fix, f"{name} not as injected")]
        differing = [key for key in COMPARED_FIELDS if not _holds(wanted.get(key), container.get(key))]
        if not _holds(_unspliced(wanted), _unspliced(container)):
            differing.append("env")
        if differing:
            return [(f"its {name} container is not the one meshguard injects (its {', '.join(differing)} "
                     "differ)", fix, f"{name} not as injected")]
    return _splices_problems(workload, effective, present, expected.renderer, fix)


def _env(container: Mapping[str, Any]) -> list[Any]:
    env = container.get("env")
    return env if isinstance(env, list) else []


def _unspliced(container: Mapping[str, Any]) -> list[Any]:
    """The container's environment but the probe splices, which are per pod."""
    return [e for e in _env(container) if not (isinstance(e, Mapping) and e.get("name") in SPLICE_VARIABLES)]


def _splices_problems(workload: Workload, effective: InjectionSettings, present: Mapping[str, Mapping[str, Any]],
                      renderer: str, fix: str) -> list[Problem]:
    """The probe splices go into the proxy's bootstrap, on its plaintext port: only the container rendering it may
    carry them, and only as meshguard writes them for the pod's probes."""
    values: dict[str, str] = {}
    for name, container in present.items():
        spliced = [e for e in _env(container) if isinstance(e, Mapping) and e.get("name") in SPLICE_VARIABLES]
        if spliced and name != renderer or any(not isinstance(e.get("value"), str) for e in spliced):
            return [(f"its {name} container is not the one meshguard injects (its env differs)", fix,
                     f"{name} not as injected")]
        values.update((e["name"], e["value"]) for e in spliced)
    if not effective.rewrite_app_probes:
        problem = None if not any(values.values()) else "it has probe configuration where probes are not rewritten"
    else:
        problem = splices_problem(workload.pod_spec, values, READINESS_PORT, effective.uncaptured_inbound_ports())
    if problem is None:
        return []
    return [(f"{problem}: a route of its own would reach the app past mutual TLS", fix, "probe routes not as injected")]

"""What a tenant could write into a mesh pod to get around its proxy, judged from the pod spec alone.

A tenant edits its own workloads (their pod templates, its pods' images) and nothing else: not meshguard's
configuration, not namespace labels. Each check below is something such a tenant could write that leaves a pod
looking meshed while its traffic is not protected, and each is decided from the spec the API server is about to
store, which the tenant cannot make say something else:

* a container running as the proxy's uid: the redirect lets that uid's traffic through untouched, and it could
  take the proxy's ports;
* NET_ADMIN, NET_RAW, ALL or privileged in any container of the tenant (app, init or ephemeral): enough to
  rewrite the pod's iptables redirect;
* under STRICT, an exclude-inbound-ports annotation naming a port the platform does not exclude: that port
  takes plaintext while the mTLS rule would say STRICT (whether the pod declares the port says nothing: the
  tenant writes both, and an app listens where it likes);
* meshguard's own containers and volumes not as meshguard's configuration makes them (every field but those
  the API server fills in and the resources): a container merely named ``meshguard-proxy``, an injected pod
  copied with an edited redirect, an extra mount or ``envFrom`` that hands the proxy a bootstrap or the redirect
  a program of the tenant's, or all of it in a pod on the node's network. On an update, meshguard's containers
  and volumes may stay as they were (a pod injected before an upgrade keeps its proxy), but not change into
  anything else;
* a tenant container mounting the proxy's state volume, where it could rewrite the proxy's bootstrap;
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
from ..injection.spec import STATE_VOLUME, build, declared_inbound
from ..workloads import CONTAINER_LISTS, Workload, as_list, as_mapping
from .mtls import STRICT

MESHGUARD_CONTAINERS = (INIT_NAME, PROXY_NAME)
# Capabilities with which a container can change the pod's network stack, the redirect included.
NETWORK_CAPABILITIES = frozenset({"NET_ADMIN", "NET_RAW", "ALL"})
# The fields of meshguard's containers that may differ from what the injector writes: filled in by the API server
# or without effect on traffic. Their env is compared apart (the probe splices in it are per pod).
FREE_FIELDS = frozenset({"name", "env", "resources", "imagePullPolicy", "terminationMessagePath",
                         "terminationMessagePolicy"})
SPLICE_VARIABLES = frozenset(envoy.SPLICES.values())
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"

Problem = tuple[str, str, str]  # (why, fix, the why in a few words)
EXCLUDE_INBOUND = PREFIX + "exclude-inbound-ports"


def _containers(spec: Mapping[str, Any], lists: tuple[str, ...] = CONTAINER_LISTS) -> Iterator[Mapping[str, Any]]:
    for key in lists:
        for container in as_list(spec.get(key)):
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
    pod_uid = as_mapping(spec.get("securityContext")).get("runAsUser")
    for name, container in _tenant_containers(spec, lists):
        security = as_mapping(container.get("securityContext"))
        uid = security.get("runAsUser", pod_uid)
        if uid == proxy_uid:
            problems.append((f"container {name} runs as uid {proxy_uid}, the proxy's, whose traffic skips the proxy",
                             f"run it as another user than {proxy_uid}", f"{name} runs as the proxy's uid"))
        added = sorted({_capability(c) for c in as_mapping(security.get("capabilities")).get("add") or ()
                        if isinstance(c, str)} & NETWORK_CAPABILITIES)
        if security.get("privileged") is True:
            added.insert(0, "privileged")
        if added:
            problems.append((f"container {name} has {', '.join(added)}, with which it could undo the traffic "
                             "redirect", f"drop {' and '.join(added)} from container {name}",
                             f"{name} has {', '.join(added)}"))
        if any(as_mapping(mount).get("name") == STATE_VOLUME for mount in as_list(container.get("volumeMounts"))):
            problems.append((f"container {name} mounts {STATE_VOLUME}, where it could rewrite the proxy's "
                             "configuration", f"remove the {STATE_VOLUME} mount from container {name}",
                             f"{name} mounts {STATE_VOLUME}"))
    return problems


def uncaptured_ports(workload: Workload, settings: InjectionSettings) -> list[int]:
    """The ports the pod's exclude-inbound-ports annotation leaves out of the proxy beyond those the platform
    does (the proxy's own and ``injection.exclude_inbound_ports``)."""
    raw = workload.annotations.get(EXCLUDE_INBOUND)
    if raw is None:
        return []
    try:
        excluded = set(port_list(raw))
    except ValueError:
        return []  # the injector refuses the pod with the annotation's format; nothing to add here
    return sorted(excluded - set(settings.uncaptured_inbound_ports()))


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


def _as_injected(spec: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of a pod spec is meshguard's: its containers (but their resources) and the volumes they mount."""
    containers = {name: {k: v for k, v in c.items() if k != "resources"}
                  for name, c in _meshguard_containers(spec).items()}
    mounted = {m.get("name") for c in containers.values() for m in map(as_mapping, as_list(c.get("volumeMounts")))}
    return containers, [v for v in map(as_mapping, as_list(spec.get("volumes"))) if v.get("name") in mounted]


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
    fix = "remove meshguard's containers and let the injector add them"
    if workload.pod_spec.get("hostNetwork") is True:
        return [("it has meshguard's containers on the node's network, where the redirect would be the node's",
                 f"run it without hostNetwork, or {fix}", "meshguard's containers with hostNetwork")]
    if old is not None and _as_injected(old.pod_spec) == _as_injected(workload.pod_spec):
        return []
    try:
        effective = effective_settings(workload, settings)
        expected = build(effective)
    except OverrideError as exc:
        return [(f"its meshguard annotations are invalid ({exc})", "fix them, then recreate the pods",
                 "invalid meshguard annotations")]
    made = {c["name"]: c for c in (*expected.init_containers, *expected.containers_front, *expected.containers_back)}
    if PROXY_NAME in present and INIT_NAME not in present:
        return [(f"it has {PROXY_NAME} without {INIT_NAME}, so no traffic is redirected to it", fix,
                 f"{PROXY_NAME} without {INIT_NAME}")]
    for name, container in present.items():
        wanted = made.get(name)
        if wanted is None:
            return [(f"its {name} container is not one meshguard's configuration adds", fix, f"{name} not as injected")]
        differing = _differing(wanted, _without_token_mount(container))
        if not _holds(_unspliced(wanted), _unspliced(container)):
            differing.append("env")
        if differing:
            return [(f"its {name} container is not the one meshguard injects (it differs in "
                     f"{', '.join(differing)})", fix, f"{name} not as injected")]
    volumes = {v.get("name"): v for v in map(as_mapping, as_list(workload.pod_spec.get("volumes")))}
    changed = [v["name"] for v in expected.volumes if not _holds(v, volumes.get(v["name"]))]
    if changed:
        return [(f"its volume {', '.join(changed)} is not the one meshguard injects", fix,
                 f"volume {', '.join(changed)} not as injected")]
    return _splices_problems(workload, effective, present, expected.renderer, fix)


def _without_token_mount(container: Mapping[str, Any]) -> Mapping[str, Any]:
    """``container`` but the API token mount the ServiceAccount admission plugin adds to every container."""
    mounts = as_list(container.get("volumeMounts"))
    kept = [m for m in mounts if as_mapping(m).get("mountPath") != SERVICE_ACCOUNT_MOUNT]
    return {**container, "volumeMounts": kept} if len(kept) != len(mounts) else container


def _differing(wanted: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """The fields, but the free ones, in which ``actual`` does not say what ``wanted`` says, or says more."""
    keys = (wanted.keys() | actual.keys()) - FREE_FIELDS
    return sorted(key for key in keys if key not in wanted or not _holds(wanted[key], actual.get(key)))


def _unspliced(container: Mapping[str, Any]) -> list[Any]:
    """The container's environment but the probe splices, which are per pod."""
    return [e for e in as_list(container.get("env"))
            if not (isinstance(e, Mapping) and e.get("name") in SPLICE_VARIABLES)]


def _splices_problems(workload: Workload, effective: InjectionSettings, present: Mapping[str, Mapping[str, Any]],
                      renderer: str, fix: str) -> list[Problem]:
    """The probe splices go into the proxy's bootstrap, on its plaintext port: only the container rendering it may
    carry them, and only as meshguard writes them for the pod's probes."""
    values: dict[str, str] = {}
    for name, container in present.items():
        spliced = [e for e in as_list(container.get("env"))
                   if isinstance(e, Mapping) and e.get("name") in SPLICE_VARIABLES]
        if spliced and name != renderer or any(not isinstance(e.get("value"), str) for e in spliced):
            return [(f"its {name} container is not the one meshguard injects (it differs in env)", fix,
                     f"{name} not as injected")]
        values.update((e["name"], e["value"]) for e in spliced)
    if not effective.rewrite_app_probes:
        problem = None if not any(values.values()) else "it has probe configuration where probes are not rewritten"
    else:
        problem = splices_problem(workload.pod_spec, values, READINESS_PORT, effective.uncaptured_inbound_ports())
    if problem is None:
        return []
    return [(f"{problem}: a route of its own would reach the app past mutual TLS", fix, "probe routes not as injected")]

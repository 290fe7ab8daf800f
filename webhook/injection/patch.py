"""The JSON patch (RFC 6902) that injects a :class:`~webhook.injection.spec.Sidecar` into a pod or pod template.

Operations are written out explicitly from what the pod has, never by diffing a mutated copy against the
original: a diff costs more than linear time in the size of the pod (Istio's injector once took seconds for a
pod with 1,500 env vars) and can touch fields meshguard does not own (``managedFields``, other webhooks'
containers, fields newer than this code). Here the cost is a few dictionary lookups plus one JSON Pointer per
inserted element, whatever the pod holds; every path is built from the object the API server sent, so the patch
applies cleanly to exactly that object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MeshguardError
from ..identity.settings import account_secret_name
from ..workloads import Workload, service_account
from .decision import DEFAULT_CONTAINER_ANNOTATION, STATUS_ANNOTATION, Decision, decide
from .overrides import apply_overrides
from .probes import Rewritten, rewrite
from .settings import READINESS_PORT, InjectionSettings
from .spec import Sidecar, build, declared_inbound

Op = dict[str, Any]


def escape(token: str) -> str:
    """A JSON Pointer reference token (RFC 6901): ``~`` -> ``~0`` first, then ``/`` -> ``~1``."""
    return token.replace("~", "~0").replace("/", "~1")


def _add(path: str, value: Any) -> Op:
    return {"op": "add", "path": path, "value": value}


def _insert_ops(parent: Mapping[str, Any], key: str, path: str, front: Sequence[Any], back: Sequence[Any]) -> list[Op]:
    """Put ``front`` first and ``back`` last in the list ``parent[key]``, creating it when it is absent or null."""
    if not front and not back:
        return []
    if not isinstance(parent.get(key), list):
        return [_add(path, [*front, *back])]
    return [_add(f"{path}/{i}", item) for i, item in enumerate(front)] + [_add(f"{path}/-", item) for item in back]


def _annotation_ops(pod: Mapping[str, Any], sidecar: Sidecar, prefix: str) -> list[Op]:
    wanted = {STATUS_ANNOTATION: sidecar.status}
    meta = pod.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, dict) else None
    spec = pod.get("spec")
    containers = spec.get("containers") if isinstance(spec, dict) else None
    first = containers[0] if isinstance(containers, list) and containers else None
    has_default = isinstance(annotations, dict) and DEFAULT_CONTAINER_ANNOTATION in annotations
    if isinstance(first, dict) and isinstance(first.get("name"), str) and not has_default:
        # kubectl logs/exec pick this container, not the proxy (which classic hold mode puts first).
        wanted[DEFAULT_CONTAINER_ANNOTATION] = first["name"]
    if not isinstance(meta, dict):
        return [_add(f"{prefix}/metadata", {"annotations": wanted})]
    if not isinstance(annotations, dict):
        return [_add(f"{prefix}/metadata/annotations", wanted)]
    return [_add(f"{prefix}/metadata/annotations/{escape(key)}", value) for key, value in wanted.items()]


def _injected_path(spec: Mapping[str, Any], sidecar: Sidecar, name: str, prefix: str) -> str:
    """Where the injected container ``name`` is once the insertions of :func:`patch_ops` are applied."""
    for i, container in enumerate(sidecar.init_containers):
        if container["name"] == name:
            return f"{prefix}/spec/initContainers/{i}"
    for i, container in enumerate(sidecar.containers_front):
        if container["name"] == name:
            return f"{prefix}/spec/containers/{i}"
    existing = spec.get("containers")
    base = len(sidecar.containers_front) + (len(existing) if isinstance(existing, list) else 0)
    (i,) = [i for i, c in enumerate(sidecar.containers_back) if c["name"] == name]
    return f"{prefix}/spec/containers/{base + i}"


def _probe_ops(spec: Mapping[str, Any], sidecar: Sidecar, rewritten: Rewritten, prefix: str) -> tuple[list[Op], ...]:
    """Replacing the app's probes (before anything is inserted, so the indexes are the pod's own), and setting the
    splice variables of the container that renders the bootstrap (after)."""
    before = [{"op": "replace", "path": f"{prefix}/spec/containers/{i}/{field}", "value": probe}
              for i, field, probe in rewritten.probes]
    holder = next(c for c in (*sidecar.init_containers, *sidecar.containers_front, *sidecar.containers_back)
                  if c["name"] == sidecar.renderer)
    path = _injected_path(spec, sidecar, holder["name"], prefix)
    names = [e["name"] for e in holder["env"]]
    # Inline, the variables are there, empty; meshguard-init's are added only when this pod needs them.
    after = [{"op": "replace", "path": f"{path}/env/{names.index(variable)}/value", "value": value} if variable in names
             else {"op": "add", "path": f"{path}/env/-", "value": {"name": variable, "value": value}}
             for variable, value in rewritten.environment().items() if value]
    return before, after


def patch_ops(pod: Mapping[str, Any], sidecar: Sidecar, prefix: str = "",
              rewritten: Rewritten | None = None) -> list[Op]:
    """The operations injecting ``sidecar`` into ``pod`` (a Pod, or a PodTemplateSpec found at ``prefix``), with
    the app's probes ``rewritten``."""
    spec = pod.get("spec")
    ops: list[Op] = []
    if not isinstance(spec, dict):
        spec = {}
        ops.append(_add(f"{prefix}/spec", {}))
    before, after = _probe_ops(spec, sidecar, rewritten, prefix) if rewritten and rewritten.probes else ([], [])
    ops += before
    ops += _annotation_ops(pod, sidecar, prefix)
    ops += _insert_ops(spec, "initContainers", f"{prefix}/spec/initContainers", sidecar.init_containers, ())
    ops += _insert_ops(spec, "containers", f"{prefix}/spec/containers", sidecar.containers_front,
                       sidecar.containers_back)
    ops += _insert_ops(spec, "volumes", f"{prefix}/spec/volumes", (), sidecar.volumes)
    return ops + after


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: Decision
    ops: list[Op]


def plan(workload: Workload, settings: InjectionSettings, own_namespace: str,
         inbound: Inbound | None = None) -> Outcome:
    """Decide and, when injecting, build the patch for ``workload.obj`` (with a static bootstrap, at the pod's
    ``inbound`` modes). The server and ``meshguard inject`` both call this. Raises
    :class:`~webhook.injection.overrides.OverrideError` for an invalid override annotation and
    :class:`NameConflict` when the pod already uses a name injection adds."""
    decision = decide(workload, settings, own_namespace)
    if not decision.inject:
        return Outcome(decision, [])
    effective = effective_settings(workload, settings, inbound)
    sidecar = build(effective)
    _check_names(workload.pod_spec, sidecar)
    rewritten = (rewrite(workload.pod_spec, READINESS_PORT, effective.uncaptured_inbound_ports())
                 if effective.rewrite_app_probes else None)
    return Outcome(decision, patch_ops(workload.template, sidecar, workload.pointer, rewritten))


# A pod's inbound mTLS modes from its PeerAuthentications: (mode, {port: mode}) (webhook.policy.mtls.Resolver).
Inbound = Callable[[Workload], tuple[str, Mapping[int, str]]]


def effective_settings(workload: Workload, settings: InjectionSettings,
                       inbound: Inbound | None = None) -> InjectionSettings:
    """What this pod gets: ``settings`` with its override annotations (raises
    :class:`~webhook.injection.overrides.OverrideError`), its drain fitted to its grace period, its
    ServiceAccount's certificate Secret, and with a static bootstrap its inbound modes: those its proxy declares
    when it has one, else ``inbound``'s. The policy compares a pod's meshguard containers with what these make."""
    effective = _fit_drain(apply_overrides(settings, workload.annotations), workload.pod_spec)
    update: dict[str, Any] = {}
    if effective.cert_secret_per_account:
        update["cert_secret"] = account_secret_name(service_account(workload.pod_spec))
    if effective.xds_address is None:
        modes = declared_inbound(workload.pod_spec) or (inbound(workload) if inbound else None)
        if modes is not None:
            mode, ports = modes
            update |= {"mtls_mode": mode,
                       "inbound_port_modes": tuple(f"{p}={m}" for p, m in sorted(ports.items()) if m != mode)}
    return effective.model_copy(update=update) if update else effective


# The API server's default terminationGracePeriodSeconds.
DEFAULT_GRACE_SECONDS = 30


def _fit_drain(settings: InjectionSettings, spec: Mapping[str, Any]) -> InjectionSettings:
    """The proxy's drain (its preStop sleep) shortened to fit the pod's grace period: the API server refuses a
    pod whose preStop sleep is not shorter than ``terminationGracePeriodSeconds`` (0 is a common choice)."""
    grace = spec.get("terminationGracePeriodSeconds")
    grace = grace if isinstance(grace, int) and not isinstance(grace, bool) and grace >= 0 else DEFAULT_GRACE_SECONDS
    if settings.drain_seconds < grace:
        return settings
    return settings.model_copy(update={"drain_seconds": max(grace - 1, 0)})


class NameConflict(MeshguardError, ValueError):
    """The pod already uses a container or volume name that injection adds, without being injected.

    Injecting anyway would give the pod two items of one name, which the API server rejects with an error that
    does not mention meshguard; refusing here names the cause.
    """


def _check_names(spec: Mapping[str, Any], sidecar: Sidecar) -> None:
    def names(key: str) -> set[str]:
        items = spec.get(key)
        if not isinstance(items, list):
            return set()
        return {name for i in items if isinstance(i, dict) and isinstance(name := i.get("name"), str)}

    taken = names("initContainers") | names("containers")
    injected = [*sidecar.init_containers, *sidecar.containers_front, *sidecar.containers_back]
    clashes = sorted({c["name"] for c in injected} & taken)
    clashes += sorted({v["name"] for v in sidecar.volumes} & names("volumes"))
    if clashes:
        listed = ", ".join(clashes)
        raise NameConflict(f"the pod already uses the name(s) {listed}, which meshguard reserves for what it "
                           "injects; rename them")

"""The effective mutual-TLS mode of a workload, resolved from PeerAuthentications the way Istio resolves it.

Istio (``ComposePeerAuthentication``) takes at most one policy per level — mesh (root namespace, no
selector), namespace (no selector, or a selector with no labels), workload (a selector whose labels are a
subset of the pod's, never from the root namespace) — picking the oldest when a level has several, then
applies them mesh → namespace → workload, where ``UNSET`` inherits the level above. Port-level modes exist only
on the workload policy, and an ``UNSET`` port inherits the workload's resolved mode. meshguard differs in one
place, by design: with no applicable policy at all the mode is the configured default (STRICT unless set),
because meshguard's own proxy enforces mTLS rather than Istio's permissive default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from ..lists import port_number
from ..workloads import object_name

Mode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]
MODES: frozenset[str] = frozenset({"UNSET", "DISABLE", "PERMISSIVE", "STRICT"})
STRICT: Mode = "STRICT"
GROUP = "security.istio.io"
VERSIONS = ("v1", "v1beta1")  # preferred first


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    namespace: str
    name: str
    created: str  # RFC 3339 creationTimestamp ("" when unknown): the oldest policy of a level wins
    selector: Mapping[str, str] | None  # matchLabels; None for namespace/mesh-wide
    mode: Mode
    port_modes: tuple[tuple[str, Mode], ...] = ()

    @property
    def display(self) -> str:
        return f"PeerAuthentication {self.namespace}/{self.name}"


def _mode(value: Any, where: str) -> Mode:
    mtls = value if isinstance(value, Mapping) else {}
    mode = mtls.get("mode") or "UNSET"
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {', '.join(sorted(MODES))}, got {mode!r}")
    return cast(Mode, mode)


def parse_peer_authentication(obj: Mapping[str, Any], namespace: str) -> PeerAuthentication:
    """Raises ``ValueError`` for a mode or selector the CRD's schema would reject."""
    name = object_name(obj)
    where = f"PeerAuthentication {namespace}/{name}"
    meta = obj.get("metadata")
    created = meta.get("creationTimestamp") if isinstance(meta, Mapping) else None
    spec = obj.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    selector = spec.get("selector")
    labels = selector.get("matchLabels") if isinstance(selector, Mapping) else None
    if labels is not None and not (
        isinstance(labels, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    ):
        raise ValueError(f"{where}: spec.selector.matchLabels must map label keys to string values")
    ports = spec.get("portLevelMtls")
    if ports is not None and not (isinstance(ports, Mapping)
                                  and all(port_number(str(key)) is not None for key in ports)):
        raise ValueError(f"{where}: spec.portLevelMtls must map port numbers (1-65535) to an mtls mode")
    return PeerAuthentication(
        namespace=namespace,
        name=name,
        created=created if isinstance(created, str) else "",
        selector=dict(labels) if labels else None,
        mode=_mode(spec.get("mtls"), f"{where} spec.mtls"),
        port_modes=tuple(
            sorted((str(port), _mode(m, f"{where} spec.portLevelMtls[{port}]")) for port, m in (ports or {}).items())
        ),
    )


@dataclass(frozen=True, slots=True)
class EffectiveMtls:
    """The resolved mode, the policy that set it (None: the configured default), and every port of the
    workload policy (``ports_from``) that is not STRICT."""

    mode: Mode
    source: PeerAuthentication | None
    weak_ports: tuple[tuple[str, Mode], ...] = ()
    ports_from: PeerAuthentication | None = None


def _oldest(policies: Iterable[PeerAuthentication]) -> PeerAuthentication | None:
    return min(policies, key=lambda p: (p.created, p.name), default=None)


def resolve(
    labels: Mapping[str, str],
    namespace_policies: Iterable[PeerAuthentication],
    root_policies: Iterable[PeerAuthentication],
    namespace: str,
    root_namespace: str,
    default_mode: Mode,
) -> EffectiveMtls:
    """The effective mode for a pod with ``labels`` in ``namespace``."""
    in_namespace = list(namespace_policies)
    mesh = _oldest(p for p in root_policies if p.selector is None)
    if namespace == root_namespace:
        # The root namespace's own wide policy is the mesh policy; its selector policies apply to no one.
        ns_level = workload = None
    else:
        ns_level = _oldest(p for p in in_namespace if p.selector is None)
        workload = _oldest(
            p for p in in_namespace if p.selector is not None and all(labels.get(k) == v for k, v in p.selector.items())
        )
    mode, source = default_mode, None
    for level in (mesh, ns_level, workload):
        if level is not None and level.mode != "UNSET":
            mode, source = level.mode, level
    if workload is None:
        return EffectiveMtls(mode, source)
    ports = ((port, mode if m == "UNSET" else m) for port, m in workload.port_modes)
    return EffectiveMtls(mode, source, tuple((port, m) for port, m in ports if m != STRICT), workload)


class PeerAuthentications(Protocol):
    """Where the resolver reads the policies (the state store)."""

    def peer_authentications(self, namespace: str) -> Sequence[PeerAuthentication]: ...


@dataclass(frozen=True, slots=True)
class Resolver:
    """What a proxy enforces inbound, from :func:`resolve` with ``policy.mtls`` (the root namespace and the mode when
    none applies): the control plane sends it live, the injector writes it into a static bootstrap."""

    root_namespace: str
    default_mode: Mode

    def modes(self, state: PeerAuthentications, namespace: str,
              labels: Mapping[str, str]) -> tuple[Mode, dict[int, Mode]]:
        """The workload's mode, and the modes of the ports its workload-level policy names."""
        effective = resolve(labels, state.peer_authentications(namespace),
                            state.peer_authentications(self.root_namespace), namespace, self.root_namespace,
                            self.default_mode)
        mode: Mode = "PERMISSIVE" if effective.mode == "UNSET" else effective.mode  # as Istio: unset is permissive
        ports: dict[int, Mode] = {}
        if effective.ports_from is not None:
            for port, port_mode in effective.ports_from.port_modes:  # port numbers: checked when parsed
                ports[int(port)] = mode if port_mode == "UNSET" else port_mode
        return mode, ports

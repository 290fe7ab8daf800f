"""Services, EndpointSlices, Pods and ServiceCIDRs, reduced to what the control plane needs to say who is meshed
and where.

The watch delivers whole objects; only a few fields of each are kept (a Pod's IPs, labels, ServiceAccount and
whether it carries meshguard's proxy), so a cluster of 10,000 pods costs megabytes, not the gigabyte of their
JSON. Written on the event loop's thread only, like the rest of the store.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..injection.annotations import port_list
from ..injection.decision import INIT_NAME, proxy_container_present
from ..netinit import EXCLUDE_INBOUND_FLAG
from ..workloads import as_list, as_mapping, labels_of, object_name, service_account

SERVICE = "Service"
ENDPOINT_SLICE = "EndpointSlice"
POD = "Pod"
SERVICE_CIDR = "ServiceCIDR"  # networking.k8s.io/v1, cluster-scoped: the ranges ClusterIPs are allocated from
KINDS = (SERVICE, ENDPOINT_SLICE, POD, SERVICE_CIDR)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True, slots=True)
class PortSpec:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]  # empty for a headless Service (and ExternalName)
    ports: tuple[PortSpec, ...]
    # Which endpoint serves depends on the caller: its node (internalTrafficPolicy: Local) or its address
    # (sessionAffinity: ClientIP).
    caller_dependent: bool = False


@dataclass(frozen=True, slots=True)
class Endpoint:
    addresses: tuple[str, ...]
    ready: bool
    pod: str | None  # the targetRef's name when it is a Pod of the slice's namespace
    # Terminating and still serving: where kube-proxy sends a Service port's traffic when no endpoint is ready.
    draining: bool = False


@dataclass(frozen=True, slots=True)
class SliceRecord:
    namespace: str
    name: str
    service: str
    ports: tuple[PortSpec, ...]
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class PodRecord:
    namespace: str
    name: str
    ips: tuple[str, ...]
    labels: Mapping[str, str]
    service_account: str
    # Carries meshguard's proxy container. Decided from the spec, not an annotation: a pod that only claims
    # injection speaks plaintext, and its clients must too.
    meshed: bool
    # Pending or Running; a finished pod keeps its IP in its status, which a new pod may already use.
    active: bool = True
    # Ports its proxy does not capture (meshguard-init's --exclude-inbound-ports): clients must speak plaintext.
    plaintext_ports: frozenset[int] = frozenset()


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _ports(items: Any) -> tuple[PortSpec, ...]:
    ports = []
    for item in as_list(items):
        item = as_mapping(item)
        port = item.get("port")
        if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
            name = item.get("name")
            ports.append(PortSpec(name if isinstance(name, str) else "", port, str(item.get("protocol") or "TCP")))
    return tuple(ports)


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(v for v in as_list(value) if isinstance(v, str) and v)


def parse_service(obj: Mapping[str, Any], namespace: str) -> ServiceRecord:
    spec = as_mapping(obj.get("spec"))
    ips = _strings(spec.get("clusterIPs")) or _strings([spec.get("clusterIP")])
    ips = tuple(ip for ip in ips if ip != "None")
    caller_dependent = spec.get("internalTrafficPolicy") == "Local" or spec.get("sessionAffinity") == "ClientIP"
    return ServiceRecord(namespace, object_name(obj), ips, _ports(spec.get("ports")), caller_dependent)


def parse_slice(obj: Mapping[str, Any], namespace: str) -> SliceRecord:
    endpoints = []
    for item in as_list(obj.get("endpoints")):
        item = as_mapping(item)
        ref = as_mapping(item.get("targetRef"))
        pod = ref.get("name") if ref.get("kind") == POD and ref.get("namespace", namespace) == namespace else None
        conditions = as_mapping(item.get("conditions"))
        ready = conditions.get("ready") is not False  # unknown counts as ready, as for kube-proxy
        serving = conditions.get("serving")
        serving = (conditions.get("ready") if serving is None else serving) is not False  # unknown: as ready says
        endpoints.append(Endpoint(_strings(item.get("addresses")), ready, pod if isinstance(pod, str) else None,
                                  conditions.get("terminating") is True and serving))
    service = labels_of(obj).get(SERVICE_NAME_LABEL, "")
    return SliceRecord(namespace, object_name(obj), service, _ports(obj.get("ports")), tuple(endpoints))


def parse_service_cidr(obj: Mapping[str, Any]) -> tuple[str, ...]:
    return _strings(as_mapping(obj.get("spec")).get("cidrs"))


def _excluded_inbound(spec: Mapping[str, Any]) -> frozenset[int]:
    for container in as_list(spec.get("initContainers")):
        container = as_mapping(container)
        args = as_list(container.get("args"))
        if container.get("name") == INIT_NAME and EXCLUDE_INBOUND_FLAG in args[:-1]:
            value = args[args.index(EXCLUDE_INBOUND_FLAG) + 1]
            try:  # the annotation's own limits: a list of the tenant's cannot swell every proxy's listener
                return frozenset(port_list(value)) if isinstance(value, str) else frozenset()
            except ValueError:
                return frozenset()
    return frozenset()


def parse_pod(obj: Mapping[str, Any], namespace: str) -> PodRecord:
    spec = as_mapping(obj.get("spec"))
    status = as_mapping(obj.get("status"))
    ips = tuple(ip for ip in (as_mapping(i).get("ip") for i in as_list(status.get("podIPs"))) if isinstance(ip, str))
    if not ips and isinstance(status.get("podIP"), str):
        ips = (status["podIP"],)
    return PodRecord(namespace, object_name(obj), ips, dict(labels_of(obj)), service_account(spec),
                     proxy_container_present(obj),
                     status.get("phase") not in ("Succeeded", "Failed"), _excluded_inbound(spec))


class Catalog:
    """The indexed records; reads are what the control plane's resource builder asks."""

    def __init__(self) -> None:
        self._services: dict[tuple[str, str], ServiceRecord] = {}
        self._slices: dict[tuple[str, str], SliceRecord] = {}
        self._slices_of: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
        self._pods: dict[tuple[str, str], PodRecord] = {}
        self._service_cidrs: dict[str, tuple[str, ...]] = {}

    # -- reads ------------------------------------------------------------------------------------------------

    def services(self) -> list[ServiceRecord]:
        return [self._services[key] for key in sorted(self._services)]

    def slices(self, namespace: str, service: str) -> list[SliceRecord]:
        names = self._slices_of.get((namespace, service), ())
        return [self._slices[(namespace, name)] for name in sorted(names)]

    def pod(self, namespace: str, name: str) -> PodRecord | None:
        return self._pods.get((namespace, name))

    def pods(self) -> list[PodRecord]:
        return [self._pods[key] for key in sorted(self._pods)]

    def service_cidrs(self) -> list[str]:
        """Every ServiceCIDR's ranges, as written (empty when the API server serves none)."""
        return sorted({cidr for cidrs in self._service_cidrs.values() for cidr in cidrs})

    def count(self, kind: str) -> int:
        sizes = {SERVICE: len(self._services), ENDPOINT_SLICE: len(self._slices), POD: len(self._pods),
                 SERVICE_CIDR: len(self._service_cidrs)}
        return sizes[kind]

    # -- writes -----------------------------------------------------------------------------------------------

    def clear(self, kind: str) -> None:
        if kind == SERVICE:
            self._services.clear()
        elif kind == ENDPOINT_SLICE:
            self._slices.clear()
            self._slices_of.clear()
        elif kind == SERVICE_CIDR:
            self._service_cidrs.clear()
        else:
            self._pods.clear()

    def put(self, kind: str, obj: Mapping[str, Any], namespace: str) -> None:
        name = object_name(obj)
        key = (namespace, name)
        if kind == SERVICE:
            self._services[key] = parse_service(obj, namespace)
        elif kind == ENDPOINT_SLICE:
            self.delete(kind, name, namespace)
            record = parse_slice(obj, namespace)
            self._slices[key] = record
            self._slices_of[(namespace, record.service)].add(name)
        elif kind == SERVICE_CIDR:
            self._service_cidrs[name] = parse_service_cidr(obj)
        else:
            self._pods[key] = parse_pod(obj, namespace)

    def delete(self, kind: str, name: str, namespace: str) -> None:
        key = (namespace, name)
        if kind == SERVICE:
            self._services.pop(key, None)
        elif kind == ENDPOINT_SLICE:
            old = self._slices.pop(key, None)
            if old is not None:
                self._slices_of[(namespace, old.service)].discard(name)
        elif kind == SERVICE_CIDR:
            self._service_cidrs.pop(name, None)
        else:
            self._pods.pop(key, None)

    def replace(self, kind: str, objects: Iterable[tuple[Mapping[str, Any], str]]) -> None:
        self.clear(kind)
        for obj, namespace in objects:
            self.put(kind, obj, namespace)

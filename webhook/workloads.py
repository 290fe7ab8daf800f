"""The kinds of workload meshguard handles, and the small facts about a workload both injection and policy need.

Kubernetes has no common interface for "the pod a controller will create": a Deployment keeps it at
``spec.template``, a CronJob two levels deeper. :data:`WORKLOAD_KINDS` is the one place that knows, and the one
place that lists the kinds: the policy handler's API-group check, the metrics' kind labels, the cluster reads
of ``meshguard audit`` and the chart's validating webhook rules (a test compares them) all follow it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class WorkloadKind:
    kind: str
    group: str  # "" for the core group
    version: str
    resource: str  # the plural that webhook rules and RBAC name
    template_path: tuple[str, ...]  # from the object to its PodTemplateSpec ({metadata, spec}); a Pod is its own
    list_call: str  # the Kubernetes client's list-in-all-namespaces method

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


_TEMPLATE = ("spec", "template")
# Controllers first, so ``meshguard audit`` shows the small lists early; Pods last.
WORKLOAD_KINDS: dict[str, WorkloadKind] = {k.kind: k for k in (
    WorkloadKind("Deployment", "apps", "v1", "deployments", _TEMPLATE, "list_deployment_for_all_namespaces"),
    WorkloadKind("StatefulSet", "apps", "v1", "statefulsets", _TEMPLATE, "list_stateful_set_for_all_namespaces"),
    WorkloadKind("DaemonSet", "apps", "v1", "daemonsets", _TEMPLATE, "list_daemon_set_for_all_namespaces"),
    WorkloadKind("CronJob", "batch", "v1", "cronjobs", ("spec", "jobTemplate", "spec", "template"),
                 "list_cron_job_for_all_namespaces"),
    WorkloadKind("Job", "batch", "v1", "jobs", _TEMPLATE, "list_job_for_all_namespaces"),
    WorkloadKind("ReplicationController", "", "v1", "replicationcontrollers", _TEMPLATE,
                 "list_replication_controller_for_all_namespaces"),
    WorkloadKind("ReplicaSet", "apps", "v1", "replicasets", _TEMPLATE, "list_replica_set_for_all_namespaces"),
    WorkloadKind("Pod", "", "v1", "pods", (), "list_pod_for_all_namespaces"),
)}
# Where a pod spec lists containers, in the order the kubelet starts them.
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {name: k.template_path for name, k in WORKLOAD_KINDS.items()}


@dataclass(frozen=True, slots=True)
class Workload:
    """A Pod or pod controller, seen through its pod template.

    ``template`` is the live dict inside ``obj`` (not a copy): mutating code patches it by its JSON Pointer
    ``pointer`` ("" for a Pod, "/spec/template" for a Deployment...).
    """

    kind: str
    namespace: str
    name: str
    obj: dict[str, Any]
    template: dict[str, Any]
    pointer: str
    # Read several times per admission (decision, selectors, exemptions, messages) by both webhooks: computed
    # once, when the workload is built. (functools.cached_property takes a lock on every first read.)
    labels: Mapping[str, str] = field(init=False, repr=False, compare=False)
    annotations: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", labels_of(self.template))
        object.__setattr__(self, "annotations", annotations_of(self.template))

    @property
    def pod_spec(self) -> dict[str, Any]:
        spec = self.template.get("spec")
        return spec if isinstance(spec, dict) else {}

    @property
    def display(self) -> str:
        """``Deployment shop/payment``: how messages name the workload."""
        return f"{self.kind} {self.namespace}/{self.name}"


def as_mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else an empty one: a field of an object as written may be anything."""
    return value if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` if it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


def _string_map(value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def labels_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    meta = obj.get("metadata")
    return _string_map(meta.get("labels")) if isinstance(meta, dict) else {}


def annotations_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    meta = obj.get("metadata")
    return _string_map(meta.get("annotations")) if isinstance(meta, dict) else {}


def object_name(obj: Mapping[str, Any]) -> str:
    """``metadata.name``, or ``generateName`` + ``*`` for a pod a controller has not named yet."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return ""
    name = meta.get("name")
    if isinstance(name, str) and name:
        return name
    generate = meta.get("generateName")
    return f"{generate}*" if isinstance(generate, str) and generate else ""


def service_account(spec: Mapping[str, Any]) -> str:
    """A pod spec's ServiceAccount: ``serviceAccountName`` (``serviceAccount``, its deprecated twin, on older
    manifests), else ``default``, as the API server's ServiceAccount plugin fills it in."""
    for key in ("serviceAccountName", "serviceAccount"):
        name = spec.get(key)
        if isinstance(name, str) and name:
            return name
    return "default"


def as_workload(obj: dict[str, Any], default_namespace: str = "") -> Workload | None:
    """View ``obj`` as a workload, or None when it is not one or has no pod template where one belongs.

    The namespace is the object's own, else ``default_namespace`` (the AdmissionRequest's namespace: pods
    created by controllers often carry none in the object).
    """
    kind = obj.get("kind")
    path = TEMPLATE_PATHS.get(kind) if isinstance(kind, str) else None
    if path is None or not isinstance(kind, str):
        return None
    template: Any = obj
    for key in path:
        template = template.get(key) if isinstance(template, dict) else None
    if not isinstance(template, dict):
        return None
    meta = obj.get("metadata")
    namespace = meta.get("namespace") if isinstance(meta, dict) else None
    return Workload(
        kind=kind,
        namespace=namespace if isinstance(namespace, str) and namespace else default_namespace,
        name=object_name(obj),
        obj=obj,
        template=template,
        pointer="".join(f"/{key}" for key in path),
    )


def controller_owner(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ownerReference with ``controller: true`` (a ReplicaSet for a Deployment's pods), if any."""
    meta = obj.get("metadata")
    refs = meta.get("ownerReferences") if isinstance(meta, dict) else None
    if isinstance(refs, list):
        for ref in refs:
            if isinstance(ref, dict) and ref.get("controller") is True:
                return ref
    return None


def iter_workloads(objects: list[dict[str, Any]], default_namespace: str) -> Iterator[Workload]:
    for obj in objects:
        workload = as_workload(obj, default_namespace)
        if workload is not None:
            yield workload

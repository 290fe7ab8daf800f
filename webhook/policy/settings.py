"""The ``policy`` section of the configuration: rule actions, exemptions, and how cluster state is kept.

Exemptions live here and only here: the platform team grants them in configuration, never a workload through
its own labels or annotations (workload label selectors are matched, but only the ones the platform wrote).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from ..section import Section
from .mtls import Mode, Resolver
from .networkpolicy import DIRECTIONS
from .selectors import parse_selector

Action = Literal["enforce", "warn", "audit"]


def _valid_selector(value: dict[str, Any]) -> dict[str, Any]:
    parse_selector(value)  # SelectorError is a ValueError: pydantic reports it with the key's path
    return value


LabelSelector = Annotated[dict[str, Any], AfterValidator(_valid_selector)]


def _valid_directions(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value or any(d not in DIRECTIONS for d in value):
        raise ValueError(f"must be a non-empty list of {' and '.join(DIRECTIONS)}")
    return tuple(d for d in DIRECTIONS if d in value)


class NetworkPolicyRule(Section):
    action: Action = "enforce"
    # Directions some NetworkPolicy must isolate for every workload: [Ingress], or [Ingress, Egress].
    directions: Annotated[tuple[str, ...], AfterValidator(_valid_directions)] = ("Ingress",)


class MtlsRule(Section):
    action: Action = "enforce"
    # Istio's root namespace: a PeerAuthentication there without a selector is the mesh-wide policy.
    root_namespace: str = "istio-system"
    # The mode when no PeerAuthentication applies (meshguard's proxy is STRICT unless told otherwise).
    default_mode: Mode = "STRICT"

    @property
    def resolver(self) -> Resolver:
        """What each proxy enforces inbound, resolved as this rule resolves it."""
        return Resolver(self.root_namespace, self.default_mode)


class Exemptions(Section):
    namespaces: tuple[str, ...] = ()
    # LabelSelectors matched against the namespace's labels.
    namespace_selectors: tuple[LabelSelector, ...] = ()
    # LabelSelectors matched against the pod (template) labels.
    workload_selectors: tuple[LabelSelector, ...] = ()


class StateSettings(Section):
    """How the live cluster state is kept (list+watch) and re-read before a denial."""

    # A denial is preceded by a live re-read of the namespace; past this the request is allowed with a warning.
    recheck_timeout_seconds: float = Field(2.0, gt=0, le=10)
    # Server-side timeout of one watch request; the watch then resumes from the last resourceVersion.
    watch_timeout_seconds: int = Field(300, ge=1)
    backoff_initial_seconds: float = Field(0.5, gt=0)
    backoff_max_seconds: float = Field(30.0, gt=0)
    # List page size (limit/continue), so that a large cluster is read in bounded chunks.
    page_size: int = Field(500, ge=1)
    # How often to look again for a kind the API server does not serve (the PeerAuthentication CRD; ServiceCIDRs
    # before Kubernetes 1.33).
    crd_poll_seconds: float = Field(60.0, gt=0)


class PolicySettings(Section):
    network_policy: NetworkPolicyRule = NetworkPolicyRule()
    mtls: MtlsRule = MtlsRule()
    # Objects created by a controller (a ReplicaSet's Pods, a Deployment's ReplicaSets, a CronJob's Jobs) are
    # checked, but their action is capped at this, so that a policy deleted later cannot stop a controller
    # from replacing crashed pods. "enforce" removes the cap.
    owned_action: Action = "warn"
    # Who counts as "a controller" for owned_action: the users the API server authenticates kube-controller-manager
    # as (per-controller service accounts with --use-service-account-credentials, else its own identity). Decided
    # from the request's user, never from the object's ownerReferences, which whoever writes it can set.
    controller_users: tuple[str, ...] = (
        "system:kube-controller-manager",
        *(f"system:serviceaccount:kube-system:{name}" for name in (
            "replicaset-controller", "deployment-controller", "statefulset-controller", "daemon-set-controller",
            "job-controller", "cronjob-controller", "replication-controller")),
    )
    exempt: Exemptions = Exemptions()
    state: StateSettings = StateSettings()

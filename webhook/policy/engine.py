"""Pure evaluation of one workload against a snapshot of cluster state: every rule's result, action and message.

The engine never does I/O; it reads the state through :class:`Snapshot` (the in-memory store implements it).
The admission handler, ``meshguard check`` and ``meshguard audit`` all call :meth:`Engine.evaluate`, so the
cluster, the CI pipeline and the audit report agree on every verdict and every sentence.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config import Settings
from ..injection.decision import (
    INJECT_KEY,
    NAMESPACE_ENABLED,
    PROXY_NAME,
    STATUS_ANNOTATION,
    decide,
    proxy_container_present,
    selected_for_mesh,
)
from ..namespaces import SYSTEM_NAMESPACES
from ..workloads import Workload, controller_owner
from . import integrity
from .mtls import STRICT, PeerAuthentication, resolve
from .networkpolicy import NetworkPolicy, coverage
from .selectors import format_labels, parse_selector
from .settings import Action

NETWORK_POLICY = "network-policy"
MTLS = "mtls"
# The namespace label that overrides the configured action of every rule for that namespace.
POLICY_LABEL = "meshguard.io/policy"
ACTIONS: tuple[Action, ...] = ("audit", "warn", "enforce")  # least to most strict
WARNING_LIMIT = 119  # the issue asks for warnings under 120 characters
# Added to a NetworkPolicy denial at admission: kubectl applies files in name order and carries on after a
# rejection, so a policy later in the same apply exists by the time the user runs it again.
ORDERING_HINT = "; if that NetworkPolicy is in this same apply, apply it first or run the apply again"


class Snapshot(Protocol):
    """What the engine reads. Implemented by :class:`webhook.state.store.Store`; all reads are from memory."""

    def namespace_labels(self, namespace: str) -> Mapping[str, str]: ...

    def network_policies_selecting(self, namespace: str, labels: Mapping[str, str]) -> Sequence[NetworkPolicy]: ...

    def peer_authentications(self, namespace: str) -> Sequence[PeerAuthentication]: ...


class LiveSnapshot(Snapshot, Protocol):
    """A snapshot that can re-read namespaces from the API server before a denial (the admission handler's)."""

    async def refresh(self, namespaces: Sequence[str]) -> bool: ...


@dataclass(frozen=True, slots=True)
class RuleResult:
    rule: str
    passed: bool
    action: Action
    workload: str  # "Deployment shop/payment"
    detail: str  # the sentence after the workload: what is wrong and the fix, or why it passes
    short: str  # the same for a warning, which must stay under 120 characters

    @property
    def message(self) -> str:
        return f"{self.workload}: {self.detail}"

    @property
    def warning(self) -> str:
        """``short`` after the workload, under the limit: a long name is cut rather than the fix at the end."""
        text = f"{self.workload}: {self.short}"
        room = WARNING_LIMIT - len(self.short) - 2
        if len(text) <= WARNING_LIMIT or room < 20:
            return textwrap.shorten(text, WARNING_LIMIT, placeholder="…")
        return f"{self.workload[:room - 1]}…: {self.short}"


@dataclass(frozen=True, slots=True)
class Evaluation:
    workload: Workload
    exempt: str | None  # why the workload is exempt; None when the rules were evaluated
    results: tuple[RuleResult, ...] = ()

    @property
    def failures(self) -> tuple[RuleResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    @property
    def passed(self) -> bool:
        return not self.failures

    def failing(self, action: Action) -> tuple[RuleResult, ...]:
        return tuple(r for r in self.results if not r.passed and r.action == action)


def least_strict(a: Action, b: Action) -> Action:
    return a if ACTIONS.index(a) <= ACTIONS.index(b) else b


class Engine:
    """The configured rules, compiled once (exemption selectors) and applied to any number of workloads."""

    def __init__(self, settings: Settings, offline: bool = False) -> None:
        """``offline``: judging manifests (``meshguard check``), where a bare Pod is judged after injection."""
        self._settings = settings
        self._offline = offline
        self._policy = settings.policy
        exempt = settings.policy.exempt
        self._always_exempt = frozenset((*SYSTEM_NAMESPACES, settings.namespace))
        self._exempt_namespaces = frozenset(exempt.namespaces)
        self._namespace_selectors = [parse_selector(s) for s in exempt.namespace_selectors]
        self._workload_selectors = [parse_selector(s) for s in exempt.workload_selectors]

    @property
    def root_namespace(self) -> str:
        return self._policy.mtls.root_namespace

    @property
    def proxy_uid(self) -> int:
        return self._settings.injection.proxy_uid

    def evaluate(self, workload: Workload, state: Snapshot, cap: Action = "enforce", old: Workload | None = None,
                 by_controller: bool | None = None) -> Evaluation:
        """Every rule's result for ``workload``; ``cap`` bounds the action (the handler lowers it for updates
        that do not change the pods). ``old`` is the object an update replaces. ``by_controller`` says whether a
        controller sent the object (the handler decides from the request's user, which a tenant cannot forge);
        None, for manifests and audits, decides from the object's controller ownerReference."""
        ns_labels = state.namespace_labels(workload.namespace)
        why_exempt = self.exemption(workload, ns_labels)
        if why_exempt:
            return Evaluation(workload, why_exempt)
        if by_controller is None:
            by_controller = controller_owner(workload.obj) is not None
        if by_controller:
            cap = least_strict(cap, self._policy.owned_action)
        override = ns_labels.get(POLICY_LABEL)
        results = []
        for rule, configured, check in (
            (NETWORK_POLICY, self._policy.network_policy.action, self._network_policy),
            (MTLS, self._policy.mtls.action, self._mtls),
        ):
            action = override if override in ACTIONS else configured
            passed, detail, short = check(workload, ns_labels, state, old)
            results.append(RuleResult(rule, passed, least_strict(action, cap), workload.display, detail, short))
        return Evaluation(workload, None, tuple(results))

    def exemption(self, workload: Workload, ns_labels: Mapping[str, str]) -> str | None:
        ns = workload.namespace
        if ns in self._always_exempt:
            return f"namespace {ns} is always exempt"
        if ns in self._exempt_namespaces:
            return f"namespace {ns} is listed in policy.exempt.namespaces"
        for selector in self._namespace_selectors:
            if selector.matches(ns_labels):
                return f"namespace {ns} matches policy.exempt.namespace_selectors ({selector})"
        for selector in self._workload_selectors:
            if selector.matches(workload.labels):
                return f"its pod labels match policy.exempt.workload_selectors ({selector})"
        return None

    def _network_policy(
        self, workload: Workload, ns_labels: Mapping[str, str], state: Snapshot, old: Workload | None
    ) -> tuple[bool, str, str]:
        labels = workload.labels
        selecting = state.network_policies_selecting(workload.namespace, labels)
        covered, missing = coverage(selecting, self._policy.network_policy.directions)
        if not missing:
            by = ", ".join(f"{d} by {p.name}" for d, p in covered.items())
            return True, f"NetworkPolicy coverage: {by}", f"covered ({by})"
        directions = " and ".join(missing)
        # A policy without policyTypes isolates Ingress only: Egress has to be named.
        enough = "podSelector {}" if list(missing) == ["Ingress"] else \
            f"podSelector {{}} and policyTypes [{', '.join(missing)}]"
        pods = f"pods with labels {format_labels(labels)}" if labels else "pods without labels"
        detail = f"no NetworkPolicy selects {pods} for {directions}; create one (a default-deny with {enough} is " \
            "enough)"
        return False, detail, f"no NetworkPolicy selects it for {directions}; add one ({enough})"

    def _mtls(self, workload: Workload, ns_labels: Mapping[str, str], state: Snapshot,
              old: Workload | None) -> tuple[bool, str, str]:
        missing = self._why_no_sidecar(workload, ns_labels)
        if missing is not None:
            why, fix, brief = missing
            detail = f"its pods will run without the meshguard sidecar ({why}), so they have no mutual TLS; {fix}"
            return False, detail, f"no sidecar: {brief}"
        injection = self._settings.injection
        # Not injected yet (a template, or a bare Pod judged offline): its pods must get past the injector.
        injected = proxy_container_present(workload.template)
        refused = None if injected else integrity.override_problem(workload, injection)
        if refused is not None:
            return False, f"the injector will refuse its pods: {refused}", \
                "the injector will refuse its pods' meshguard annotations; fix them"
        bypass = (integrity.tenant_problems(workload.pod_spec, injection.proxy_uid)
                  + integrity.sidecar_problems(workload, injection, old))
        if bypass:  # every one named, so that the next apply is not refused for the next one
            whys = "; ".join(why for why, _, _ in bypass)
            fixes = "; ".join(dict.fromkeys(fix for _, fix, _ in bypass))
            _, fix, brief = bypass[0]
            more = f" (+{len(bypass) - 1} more)" if len(bypass) > 1 else ""
            return False, f"its traffic could bypass the meshguard proxy: {whys}; {fixes}", f"{brief}; {fix}{more}"
        mtls = self._policy.mtls
        effective = resolve(
            workload.labels,
            state.peer_authentications(workload.namespace),
            state.peer_authentications(mtls.root_namespace),
            workload.namespace,
            mtls.root_namespace,
            mtls.default_mode,
        )
        source = effective.source
        origin = source.display if source else \
            f"no PeerAuthentication applies; meshguard's default is {mtls.default_mode}"
        if effective.mode != STRICT:
            fix = "set its spec.mtls.mode to STRICT" if source else \
                f"create a PeerAuthentication in namespace {workload.namespace} with spec.mtls.mode STRICT"
            detail = f"mutual TLS mode is {effective.mode} ({origin}), so plaintext is accepted; {fix}"
            return False, detail, f"mTLS is {effective.mode} ({origin}); {fix}"
        if effective.weak_ports:
            ports = ", ".join(f"port {port} is {mode}" for port, mode in effective.weak_ports)
            assert effective.ports_from is not None  # weak ports come from the workload policy
            where = f"portLevelMtls of {effective.ports_from.display}"
            detail = f"{ports} ({where}), so plaintext is accepted there; set those entries to STRICT or remove them"
            return False, detail, f"{ports} ({where}); set STRICT"
        stale = integrity.plaintext_accepted(workload, injection)
        if stale:
            fix = "delete and recreate it so that its proxy gets it" if workload.kind == "Pod" else \
                "restart its pods (kubectl rollout restart) so that their proxies get it"
            detail = (f"its proxy still takes plaintext ({stale}), as injected before mutual TLS became STRICT "
                      f"({origin}); {fix}")
            return False, detail, f"proxy injected before STRICT ({stale}); restart its pods"
        uncaptured = integrity.uncaptured_ports(workload, injection)
        if uncaptured:
            ports = ", ".join(map(str, uncaptured))
            why = f"port {ports} is left out of the proxy by {integrity.EXCLUDE_INBOUND}, so it takes plaintext"
            fix = "remove it from the annotation"
            brief = f"port {ports} excluded from the proxy; remove it from {integrity.EXCLUDE_INBOUND}"
            return False, f"{why} although mutual TLS is STRICT ({origin}); {fix}", brief
        return True, f"pods carry the meshguard sidecar; mutual TLS is STRICT ({origin})", "mTLS STRICT"

    def _why_no_sidecar(self, workload: Workload, ns_labels: Mapping[str, str]) -> tuple[str, str, str] | None:
        """None when the pods will carry the proxy, else (why not, the fix, both in a few words for a warning). A
        Pod is judged by its containers: validation runs after mutation, so an injected Pod already has them. The
        status annotation alone does not count: a workload could write it itself, and only the container carries
        mTLS. Offline (``meshguard check``) a bare Pod is judged as the injector would make it."""
        if proxy_container_present(workload.template):
            return None
        ns = workload.namespace
        label = f"{INJECT_KEY}={NAMESPACE_ENABLED}"
        if not selected_for_mesh(ns_labels, workload.labels):
            return (f"namespace {ns} is not labeled {label}", f"label namespace {ns} {label}",
                    f"namespace not meshed; label it {label}")
        decision = decide(workload, self._settings.injection, self._settings.namespace)
        if decision.reason in ("opt-out-label", "opt-out-annotation"):
            fix = f"remove the {INJECT_KEY} {decision.reason.removeprefix('opt-out-')}"
            return decision.message, fix, f"opted out; {fix}"
        if decision.reason == "already-injected":
            fix = f"recreate it without the {STATUS_ANNOTATION} annotation" if workload.kind == "Pod" else \
                f"remove the {STATUS_ANNOTATION} annotation from its pod template"
            return (f"it has the {STATUS_ANNOTATION} annotation of an injected pod but no {PROXY_NAME} container", fix,
                    f"{STATUS_ANNOTATION} without a proxy; remove it")
        exempt = "ask the platform team to exempt it in policy.exempt"
        fixes = {"host-network": (f"run it without hostNetwork, or {exempt}", "uses hostNetwork; run without it"),
                 "other-mesh": ("remove the other mesh's injection from it, or ask the platform team to exempt it",
                                "in another mesh; remove its injection")}
        if not decision.inject:
            fix, brief = fixes.get(decision.reason, (exempt, f"not injected ({decision.reason}); {exempt}"))
            return decision.message, fix, brief
        if workload.kind == "Pod" and not self._offline:
            return ("meshguard's injector did not add it: it was not reachable or not called when the pod was created",
                    "delete and recreate the pod", "not injected; delete and recreate it")
        return None

"""``POST /validate`` over real HTTPS, against a real server process reading its state from manifest files."""

from __future__ import annotations

import base64
import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import pytest
import yaml

from tests.conftest import RunningServer, as_injected, review, start_server
from webhook import envoy
from webhook.cli import build_parser

MESH = {"meshguard.io/inject": "enabled"}


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def deny_all(ns: str) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-all", "namespace": ns}, "spec": {"podSelector": {}}}


STATE = [
    namespace("shop", **MESH),
    namespace("open", **MESH),  # in the mesh, no NetworkPolicy
    namespace("soft", **MESH, **{"meshguard.io/policy": "warn"}),
    namespace("quiet", **MESH, **{"meshguard.io/policy": "audit"}),
    deny_all("shop"),
    {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
     "metadata": {"name": "legacy", "namespace": "shop"},
     "spec": {"selector": {"matchLabels": {"app": "legacy"}}, "mtls": {"mode": "PERMISSIVE"}}},
]


def deployment(name: str = "payment", replicas: int = 2, image: str = "shop/payment:1") -> dict[str, Any]:
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "app", "image": image}]}}}}


def write_state(directory: Path, objects: list[dict[str, Any]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state.yaml").write_text(yaml.safe_dump_all(objects))
    return directory


def serve_state(tmp_path_factory: pytest.TempPathFactory, name: str,
                objects: list[dict[str, Any]]) -> Iterator[RunningServer]:
    """A server reading ``objects`` as its cluster state, for a module-scoped fixture to yield from."""
    work = tmp_path_factory.mktemp(name)
    running = start_server(work, args=("--state", str(write_state(work / "state", objects))))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from serve_state(tmp_path_factory, "validate", STATE)


def validate(server: RunningServer, obj: dict[str, Any] | None, ns: str, **kwargs: Any) -> dict[str, Any]:
    with server.client() as client:
        r = client.post("/validate", json=review(obj, namespace=ns, **kwargs))
    assert r.status_code == 200, r.text
    return r.json()["response"]


def test_covered_workload_in_the_mesh_is_allowed_without_warnings(server: RunningServer) -> None:
    response = validate(server, deployment(), "shop")
    assert response["allowed"] is True and "warnings" not in response and "status" not in response


def test_denial_lists_every_failed_rule_in_one_line(server: RunningServer) -> None:
    response = validate(server, deployment(), "bare")
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    assert response["status"]["message"] == (
        "Deployment bare/payment: no NetworkPolicy selects pods with labels {app=payment} for Ingress; create one "
        "(a default-deny with podSelector {} is enough); if that NetworkPolicy is in this same apply, apply it first "
        "or run the apply again; also, its pods will run without the meshguard sidecar (namespace bare is not "
        "labeled meshguard.io/inject=enabled), so they have no mutual TLS; label namespace bare "
        "meshguard.io/inject=enabled")


def test_only_the_failing_rule_is_reported(server: RunningServer) -> None:
    response = validate(server, deployment(), "open")
    assert response["allowed"] is False
    assert response["status"]["message"].startswith("Deployment open/payment: no NetworkPolicy selects")
    assert "\n" not in response["status"]["message"]
    legacy = validate(server, deployment("legacy"), "shop")
    assert legacy["allowed"] is False
    assert legacy["status"]["message"] == (
        "Deployment shop/legacy: mutual TLS mode is PERMISSIVE (PeerAuthentication shop/legacy), so plaintext is "
        "accepted; set its spec.mtls.mode to STRICT")


def test_warn_namespace_allows_with_short_warnings(server: RunningServer) -> None:
    response = validate(server, deployment(), "soft")
    assert response["allowed"] is True and "status" not in response
    assert response["warnings"] == [
        "Deployment soft/payment: no NetworkPolicy selects it for Ingress; add one (podSelector {})"]
    assert all(len(w) < 120 for w in response["warnings"])


def test_audit_namespace_allows_silently_but_logs_and_counts(server: RunningServer) -> None:
    response = validate(server, deployment("audited"), "quiet", uid="audit-me")
    assert response == {"uid": "audit-me", "allowed": True}
    entry = server.admission_log("audit-me")
    assert entry["reason"] == "policy-audit"
    assert entry["violations"] == ["[network-policy:audit] Deployment quiet/audited: no NetworkPolicy selects pods "
                                   "with labels {app=audited} for Ingress; create one (a default-deny with "
                                   "podSelector {} is enough)"]
    metrics = httpx.get(f"{server.health_url}/metrics").text
    assert 'meshguard_policy_results_total{action="audit",result="fail",rule="network-policy"}' in metrics
    assert 'meshguard_state_objects{kind="NetworkPolicy"} 1.0' in metrics


def test_every_controller_kind_and_pods(server: RunningServer) -> None:
    template = {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
    objects = [
        {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": "x"}, "spec": {"template": template}}
        for kind in ("StatefulSet", "DaemonSet", "ReplicaSet")
    ] + [
        {"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": "x"},
         "spec": {"template": template}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}, "spec": {"template": template}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "x"},
         "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": template}}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "labels": {"app": "x"}},
         "spec": {"containers": [{"name": "c", "image": "i"}]}},
    ]
    for obj in objects:
        denied = validate(server, obj, "open")
        assert denied["allowed"] is False, obj["kind"]
        assert denied["status"]["message"].startswith(f"{obj['kind']} open/x: no NetworkPolicy"), denied
        # In the covered namespace only the Pod fails: it was not injected (it has no meshguard-proxy).
        allowed = validate(server, obj, "shop")
        assert allowed["allowed"] is (obj["kind"] != "Pod"), allowed


def test_injected_pod_passes_and_controller_made_pods_are_only_warned(server: RunningServer) -> None:
    pod = as_injected({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"generateName": "payment-7d4b9-", "labels": {"app": "payment"}},
                       "spec": {"containers": [{"name": "app", "image": "shop/payment:1"}]}})
    assert validate(server, pod, "shop")["allowed"] is True
    owned = copy.deepcopy(pod)
    owned["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "payment-7d4b9",
                                             "uid": "u", "controller": True}]
    # Sent by the ReplicaSet controller: a policy deleted later must not stop it replacing pods.
    response = validate(server, owned, "open", user="system:serviceaccount:kube-system:replicaset-controller")
    assert response["allowed"] is True
    assert response["warnings"] == ["Pod open/payment-7d4b9-*: no NetworkPolicy selects it for Ingress; add one "
                                    "(podSelector {})"]
    # The same owner reference written by a tenant: not a controller, so enforced.
    forged = validate(server, owned, "open", user="jane@example.com")
    assert forged["allowed"] is False and "no NetworkPolicy selects" in forged["status"]["message"]


def test_updates(server: RunningServer) -> None:
    old = deployment()
    scaled = deployment(replicas=5)
    # Scaling leaves the pods as they are: warned, never denied.
    response = validate(server, scaled, "open", operation="UPDATE", old=old)
    assert response["allowed"] is True and response["warnings"][0].startswith("Deployment open/payment: no Network")
    # A new image changes the pods: enforced like a creation.
    assert validate(server, deployment(image="shop/payment:2"), "open", operation="UPDATE", old=old)["allowed"] is False
    # An object on its way out (finalizers being removed) is never blocked.
    deleting = copy.deepcopy(deployment(image="shop/payment:2"))
    deleting["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    assert validate(server, deleting, "open", operation="UPDATE", old=old)["allowed"] is True


@pytest.mark.parametrize(
    ("obj", "kwargs"),
    [
        ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}, {}),
        ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}, {}),
        (None, {"operation": "DELETE", "old": deployment(), "kind": "Deployment"}),
        (deployment(), {"operation": "CONNECT"}),
        ({"apiVersion": "example.com/v1", "kind": "Job", "metadata": {"name": "j"},
          "spec": {"template": {"spec": {"containers": []}}}}, {}),
    ],
    ids=["service", "configmap", "delete", "connect", "custom-resource-named-job"],
)
def test_everything_else_is_allowed(server: RunningServer, obj: dict[str, Any] | None, kwargs: dict[str, Any]) -> None:
    response = validate(server, obj, "open", **kwargs)
    assert response["allowed"] is True and "warnings" not in response


def test_exempt_namespaces(server: RunningServer) -> None:
    for ns in ("kube-system", "meshguard"):
        assert validate(server, deployment(), ns, uid="exempt") == {"uid": "exempt", "allowed": True}


@pytest.mark.parametrize(
    "obj",
    [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": "x"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": "bad"},
         "spec": {"template": {"metadata": 7}}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
         "spec": {"template": {"metadata": {"labels": {"app": 1, "x": None}}, "spec": {"containers": "nope"}}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": None},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "ownerReferences": "x"},
         "spec": {"initContainers": [None, 3], "containers": [{"name": ["x"]}]}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"}, "spec": {"jobTemplate": []}},
    ],
)
def test_malformed_workloads_get_an_answer(server: RunningServer, obj: dict[str, Any]) -> None:
    response = validate(server, obj, "open", uid="odd")
    assert response["uid"] == "odd" and isinstance(response["allowed"], bool)
    assert "meshguard failed to evaluate" not in str(response)


def test_a_policy_created_an_instant_before_is_honoured(server_factory: Any, tmp_path: Path) -> None:
    """Never deny on stale state: the state directory is read again before a denial."""
    state = write_state(tmp_path / "state", [namespace("shop", **MESH)])
    srv = server_factory(args=("--state", str(state)))
    assert validate(srv, deployment(), "shop")["allowed"] is False
    (state / "zz-policy.yaml").write_text(yaml.safe_dump(deny_all("shop")))
    assert validate(srv, deployment(), "shop")["allowed"] is True
    metrics = httpx.get(f"{srv.health_url}/metrics").text
    assert 'meshguard_policy_live_rechecks_total{outcome="fresh"} 2.0' in metrics


def test_unreadable_state_on_recheck_allows_with_a_warning(server_factory: Any, tmp_path: Path) -> None:
    state = write_state(tmp_path / "state", [namespace("shop", **MESH)])
    srv = server_factory(args=("--state", str(state)))
    (state / "broken.yaml").write_text("kind: [unclosed")
    response = validate(srv, deployment(), "shop")
    assert response["allowed"] is True
    assert response["warnings"][-1].startswith("meshguard could not re-read this namespace's policies")
    assert response["warnings"][0].startswith("Deployment shop/payment: no NetworkPolicy selects it")


def test_dev_without_state_is_ready_at_once_and_empty(server_factory: Any) -> None:
    srv = server_factory()
    ready = httpx.get(f"{srv.health_url}/readyz").json()
    assert ready["ready"] is True and ready["checks"]["state"] is True
    assert validate(srv, deployment(), "shop")["allowed"] is False


def test_configured_actions_and_directions(server_factory: Any, tmp_path: Path) -> None:
    state = write_state(tmp_path / "state", [namespace("shop", **MESH), deny_all("shop")])
    srv = server_factory(config={"policy": {"network_policy": {"directions": ["Ingress", "Egress"], "action": "warn"}}},
                         args=("--state", str(state)))
    response = validate(srv, deployment(), "shop")
    assert response["allowed"] is True
    assert response["warnings"] == ["Deployment shop/payment: no NetworkPolicy selects it for Egress; add one "
                                    "(podSelector {} and policyTypes [Egress])"]


def test_invalid_state_directory_stops_the_server(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as raised:
        start_server(tmp_path / "srv", args=("--state", str(tmp_path / "missing")))
    assert "cannot read the state directory" in str(raised.value)



def test_adding_only_meshguards_status_annotation_on_update_is_enforced(server: RunningServer) -> None:
    """Counted as "pods unchanged" it would only be warned on, and every new pod would then skip injection."""
    old = deployment()
    claimed = deployment()
    claimed["spec"]["template"]["metadata"]["annotations"] = {"meshguard.io/status": '{"version": "0.1.0"}'}
    response = validate(server, claimed, "shop", operation="UPDATE", old=old)
    assert response["allowed"] is False
    assert "it has the meshguard.io/status annotation of an injected pod but no meshguard-proxy container" in \
        response["status"]["message"]


def test_debug_containers_in_a_meshed_pod_cannot_undo_the_redirect(server: RunningServer) -> None:
    pod = as_injected({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "labels": {"app": "web"}},
                       "spec": {"containers": [{"name": "app", "image": "shop/web:1"}]}})

    def debug(security: dict[str, Any]) -> dict[str, Any]:
        updated = copy.deepcopy(pod)
        updated["spec"]["ephemeralContainers"] = [{"name": "debugger-x", "image": "busybox",
                                                   "securityContext": security}]
        return validate(server, updated, "open", operation="UPDATE", old=pod, sub_resource="ephemeralcontainers")

    plain = debug({})
    assert plain["allowed"] is True  # kubectl debug as usual, even in a namespace failing other rules
    refused = debug({"capabilities": {"add": ["NET_ADMIN"]}})
    assert refused["allowed"] is False
    assert refused["status"]["message"] == (
        "Pod open/web-1: its debug container could bypass the meshguard proxy: container debugger-x has NET_ADMIN, "
        "with which it could undo the traffic redirect; drop NET_ADMIN from container debugger-x")
    assert debug({"runAsUser": 1337})["allowed"] is False


def _peer_authentication(mode: str, **ports: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if ports:
        spec |= {"selector": {"matchLabels": {"app": "web"}},
                 "portLevelMtls": {port.removeprefix("p"): {"mode": m} for port, m in ports.items()}}
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "web" if ports else "default", "namespace": "shop"}, "spec": spec}


def test_with_a_static_bootstrap_the_proxy_enforces_what_the_rule_reports_and_a_later_change_is_named(
        server_factory: Any, tmp_path: Path) -> None:
    """Without the control plane, a proxy's inbound modes are its PeerAuthentications' when it was injected: what
    /validate says is what the proxy does, and when a policy becomes STRICT after, /validate says the proxy still
    takes plaintext, and how to fix it."""
    state = write_state(tmp_path / "state", [namespace("shop", **MESH), deny_all("shop"),
                                              _peer_authentication("PERMISSIVE"),
                                              _peer_authentication("UNSET", p8081="DISABLE")])
    srv = server_factory(args=("--state", str(state)))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "labels": {"app": "web"}},
           "spec": {"containers": [{"name": "app", "image": "shop/web:1", "ports": [{"containerPort": 8080}]}]}}

    def injected() -> dict[str, Any]:
        with srv.client() as client:
            answer = client.post("/mutate", json=review(pod, namespace="shop")).json()["response"]
        return jsonpatch.apply_patch(copy.deepcopy(pod), yaml.safe_load(base64.b64decode(answer["patch"])))

    def proxy_env(obj: dict[str, Any]) -> dict[str, str]:
        (proxy,) = [c for c in obj["spec"]["initContainers"] if c["name"] == "meshguard-proxy"]
        return {e["name"]: e.get("value", "") for e in proxy["env"]}

    permissive = injected()
    assert proxy_env(permissive)["MESHGUARD_INBOUND_MTLS"] == "PERMISSIVE,8081=DISABLE"
    # The bootstrap meshguard-init renders from its arguments takes plaintext on every port, and on 8081 as is.
    init = next(c for c in permissive["spec"]["initContainers"] if c["name"] == "meshguard-init")
    bootstrap = envoy.render(envoy.options_from(build_parser().parse_args(init["args"])))
    assert '"inbound-plaintext-8081"' in bootstrap and '"inbound-plaintext"' in bootstrap
    response = validate(srv, permissive, "shop")
    assert not response["allowed"] and "mutual TLS mode is PERMISSIVE (PeerAuthentication shop/default)" in \
        response["status"]["message"]
    # The namespace goes STRICT (and the port exception goes); the running pod's proxy does not know.
    write_state(state, [namespace("shop", **MESH), deny_all("shop"), _peer_authentication("STRICT")])
    deadline = time.monotonic() + 10
    while (message := validate(srv, permissive, "shop").get("status", {}).get("message", "")) and \
            "still takes plaintext" not in message:
        assert time.monotonic() < deadline, message
        time.sleep(0.1)
    assert message.endswith("its proxy still takes plaintext (PERMISSIVE on every port, port 8081 DISABLE), as "
                            "injected before mutual TLS became STRICT (PeerAuthentication shop/default); delete "
                            "and recreate it so that its proxy gets it")
    # Its replacement is injected STRICT, and passes.
    strict = injected()
    assert proxy_env(strict)["MESHGUARD_INBOUND_MTLS"] == "STRICT"
    assert validate(srv, strict, "shop")["allowed"] is True
    # Copying the old sidecar while claiming STRICT does not pass either: the arguments rendering its bootstrap
    # are not STRICT's.
    forged = copy.deepcopy(permissive)
    for variable in next(c for c in forged["spec"]["initContainers"] if c["name"] == "meshguard-proxy")["env"]:
        if variable["name"] == "MESHGUARD_INBOUND_MTLS":
            variable["value"] = "STRICT"
    assert "meshguard-init container is not the one meshguard injects (it differs in args)" in \
        validate(srv, forged, "shop")["status"]["message"]

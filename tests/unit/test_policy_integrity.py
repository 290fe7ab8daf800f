"""A tenant who can edit its own workloads cannot make the mTLS rule pass for a pod whose traffic bypasses the
proxy: each way around it fails the rule, and every legitimate variant still passes."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.conftest import as_injected
from webhook.config import Settings
from webhook.injection.settings import InjectionSettings
from webhook.policy.engine import MTLS, Engine
from webhook.state.files import build_store
from webhook.workloads import as_workload

MESH_NS = {"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": "shop", "labels": {"meshguard.io/inject": "enabled"}}}
DENY_ALL = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": "shop"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}


def app_pod(**spec: Any) -> dict[str, Any]:
    container = {"name": "app", "image": "shop/app:1", "ports": [{"containerPort": 8080}]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "labels": {"app": "web"}},
            "spec": {"containers": [container], **spec}}


def template_of(pod: dict[str, Any]) -> dict[str, Any]:
    """A Deployment whose pods are ``pod``: judged before injection, which happens on its pods."""
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": pod["metadata"], "spec": pod["spec"]}}}


def mtls(obj: dict[str, Any], old: dict[str, Any] | None = None, settings: Settings | None = None) -> tuple[bool, str]:
    store, _ = build_store([MESH_NS, DENY_ALL], "shop")
    engine = Engine(settings or Settings())
    previous = as_workload(old, "shop") if old else None
    evaluation = engine.evaluate(as_workload(obj, "shop"), store, old=previous)
    (result,) = [r for r in evaluation.results if r.rule == MTLS]
    return result.passed, result.message


def test_an_injected_pod_and_a_pod_to_be_injected_pass() -> None:
    assert mtls(as_injected(app_pod()))[0] and mtls(template_of(app_pod()))[0]
    # Per-pod overrides the injector honoured are part of what "as meshguard makes it" means.
    tuned = app_pod()
    tuned["metadata"]["annotations"] = {"meshguard.io/log-level": "debug", "meshguard.io/proxy-cpu": "200m"}
    assert mtls(as_injected(tuned))[0]
    # A drain fitted to a short grace period, and a certificate Secret per ServiceAccount: what it made too.
    for grace in (0, 3):
        assert mtls(as_injected(app_pod(terminationGracePeriodSeconds=grace)))[0]
    settings = Settings(injection={"cert_secret_per_account": True})
    assert mtls(as_injected(app_pod(serviceAccountName="web"), settings=settings.injection), settings=settings)[0]
    # Classic mode, a hold, and the bootstrap inline: all what meshguard makes.
    for injection in ({"native_sidecar": False, "hold_application_until_proxy_starts": True},
                      {"bootstrap": "inline"}):
        settings = Settings(injection=injection)
        assert mtls(as_injected(app_pod(), settings=settings.injection), settings=settings)[0]


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for key in ("initContainers", "containers") for c in pod["spec"].get(key, []) if c["name"] == name]
    return found


def _edit(pod: dict[str, Any], name: str, **fields: Any) -> dict[str, Any]:
    edited = copy.deepcopy(pod)
    _container(edited, name).update(fields)
    return edited


def _with_volume(pod: dict[str, Any], volume: dict[str, Any]) -> dict[str, Any]:
    edited = copy.deepcopy(pod)
    edited["spec"]["volumes"] = [v for v in edited["spec"]["volumes"] if v["name"] != volume["name"]] + [volume]
    return edited


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda p: _edit(p, "meshguard-proxy", image="attacker/envoy:1"), "meshguard-proxy container is not the one "
                                                                      "meshguard injects (it differs in image)"),
    (lambda p: _edit(p, "meshguard-init", args=["netinit", "--dry-run"]), "meshguard-init container is not the one "
                                                                         "meshguard injects (it differs in args)"),
    (lambda p: {**p, "spec": {**p["spec"], "initContainers": [c for c in p["spec"]["initContainers"]
                                                              if c["name"] != "meshguard-init"]}},
     "it has meshguard-proxy without meshguard-init"),
    # What the first comparison (image, command, args, ports, securityContext, env) let through:
    (lambda p: _edit(p, "meshguard-init", envFrom=[{"configMapRef": {"name": "mine"}}]),
     "meshguard-init container is not the one meshguard injects (it differs in envFrom)"),
    (lambda p: _edit(p, "meshguard-init", volumeMounts=[*_container(p, "meshguard-init")["volumeMounts"],
                                                        {"name": "mine", "mountPath": "/opt/venv/bin"}]),
     "(it differs in volumeMounts)"),
    (lambda p: _edit(p, "meshguard-proxy", workingDir="/tmp"), "(it differs in workingDir)"),
    (lambda p: _edit(p, "meshguard-proxy", lifecycle=None), "(it differs in lifecycle)"),
    (lambda p: _with_volume(p, {"name": "meshguard-envoy", "configMap": {"name": "my-bootstrap"}}),
     "its volume meshguard-envoy is not the one meshguard injects"),
    (lambda p: {**p, "spec": {**p["spec"], "hostNetwork": True}},
     "it has meshguard's containers on the node's network"),
])
def test_a_fake_or_edited_sidecar_fails(change: Any, fragment: str) -> None:
    passed, message = mtls(change(as_injected(app_pod())))
    assert not passed and fragment in message, message
    assert message.endswith("remove meshguard's containers and let the injector add them")


def test_a_container_merely_named_like_the_proxy_fails() -> None:
    fake = app_pod(initContainers=[{"name": "meshguard-proxy", "image": "busybox", "restartPolicy": "Always"}])
    passed, message = mtls(fake)
    assert not passed and "meshguard-proxy" in message


def test_what_the_api_server_fills_in_and_the_resources_may_differ() -> None:
    stored = _edit(as_injected(app_pod()), "meshguard-proxy", terminationMessagePath="/dev/termination-log",
                   imagePullPolicy="Always", resources={"requests": {"cpu": "1"}})
    for container in _container(stored, "meshguard-proxy")["ports"]:
        container["protocol"] = "TCP"
    for name in ("meshguard-init", "meshguard-proxy"):  # the ServiceAccount admission plugin's
        _container(stored, name)["volumeMounts"].append({"name": "kube-api-access-x2v9q", "readOnly": True,
                                                         "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})
    assert mtls(stored)[0]


def test_a_tenant_container_may_not_mount_the_proxys_state() -> None:
    pod = app_pod()
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "meshguard-envoy", "mountPath": "/x"}]
    for candidate in (template_of(pod), as_injected(pod)):
        passed, message = mtls(candidate)
        assert not passed and message.endswith("remove the meshguard-envoy mount from container app"), message


def test_an_update_may_keep_the_sidecar_it_had_but_not_change_it() -> None:
    before = as_injected(app_pod())
    # Injected by an older configuration (another proxy image): a later update of the pod keeps it.
    older = _edit(before, "meshguard-proxy", image="envoyproxy/envoy:v1.39.0")
    relabeled = copy.deepcopy(older)
    relabeled["metadata"]["labels"]["tier"] = "web"
    assert mtls(relabeled, old=older)[0]
    # Swapping meshguard-init's image on an update (e.g. while a scheduling gate holds the pod): refused.
    swapped = _edit(before, "meshguard-init", image="attacker/init:1")
    passed, message = mtls(swapped, old=before)
    assert not passed and "meshguard-init container is not the one meshguard injects" in message
    # Nor the volumes its containers mount: the pod is then judged against the configuration of today.
    repointed = _with_volume(older, {"name": "meshguard-envoy", "configMap": {"name": "my-bootstrap"}})
    assert not mtls(repointed, old=older)[0]
    assert not mtls(_with_volume(before, repointed["spec"]["volumes"][-1]), old=before)[0]


@pytest.mark.parametrize(("spec", "container", "fragment"), [
    ({"securityContext": {"runAsUser": 1337}}, {}, "container app runs as uid 1337, the proxy's"),
    ({}, {"securityContext": {"runAsUser": 1337}}, "container app runs as uid 1337"),
    ({}, {"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}, "container app has NET_ADMIN"),
    ({}, {"securityContext": {"capabilities": {"add": ["CAP_NET_RAW"]}}}, "container app has NET_RAW"),
    ({}, {"securityContext": {"capabilities": {"add": ["all"]}}}, "container app has ALL"),
    ({}, {"securityContext": {"privileged": True}}, "container app has privileged"),
])
def test_the_proxy_uid_and_network_capabilities_fail_in_mesh_pods(spec: dict[str, Any], container: dict[str, Any],
                                                                  fragment: str) -> None:
    pod = app_pod(**spec)
    pod["spec"]["containers"][0].update(container)
    for candidate in (template_of(pod), as_injected(pod)):  # before injection and after
        passed, message = mtls(candidate)
        assert not passed and fragment in message, message
    # The container's own uid wins over the pod-level one.
    if spec:
        pod["spec"]["containers"][0]["securityContext"] = {"runAsUser": 1000}
        assert mtls(template_of(pod))[0]


def test_every_way_around_the_proxy_is_named_at_once() -> None:
    pod = app_pod(securityContext={"runAsUser": 1337})
    pod["spec"]["containers"][0]["securityContext"] = {"capabilities": {"add": ["NET_ADMIN"]}}
    passed, message = mtls(template_of(pod))
    assert not passed
    assert message.endswith("container app runs as uid 1337, the proxy's, whose traffic skips the proxy; container app "
                            "has NET_ADMIN, with which it could undo the traffic redirect; run it as another user than "
                            "1337; drop NET_ADMIN from container app")


def test_an_init_container_with_net_admin_fails_too() -> None:
    pod = app_pod(initContainers=[{"name": "setup", "image": "busybox",
                                   "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}])
    passed, message = mtls(template_of(pod))
    assert not passed and "container setup has NET_ADMIN" in message
    assert "drop NET_ADMIN from container setup" in message


def test_excluding_a_port_under_strict_fails_declared_or_not_unless_the_platform_excludes_it() -> None:
    pod = app_pod()
    pod["metadata"]["annotations"] = {"meshguard.io/exclude-inbound-ports": "15021,8080"}
    passed, message = mtls(template_of(pod))
    assert not passed
    assert "port 8080 is left out of the proxy by meshguard.io/exclude-inbound-ports, so it takes plaintext" in message
    assert message.endswith("remove it from the annotation")
    # The app need not declare a port to listen on it.
    pod["metadata"]["annotations"] = {"meshguard.io/exclude-inbound-ports": "9090"}
    assert not mtls(template_of(pod))[0]
    pod["metadata"]["annotations"] = {"meshguard.io/exclude-inbound-ports": "8080"}
    assert not mtls(as_injected(pod))[0]  # after injection too
    # The proxy's own ports, and those the platform excludes for every pod, are the platform's call.
    pod["metadata"]["annotations"] = {"meshguard.io/exclude-inbound-ports": "15021,15090,9090"}
    platform = Settings(injection={"exclude_inbound_ports": [9090]})
    assert mtls(template_of(pod), settings=platform)[0]
    assert mtls(as_injected(pod, settings=platform.injection), settings=platform)[0]


def test_a_template_claiming_injection_is_judged_by_its_containers() -> None:
    claimed = app_pod()
    claimed["metadata"]["annotations"] = {"meshguard.io/status": '{"version": "0.1.0"}'}
    passed, message = mtls(template_of(claimed))
    assert not passed and "it has the meshguard.io/status annotation of an injected pod but no meshguard-proxy " \
        "container" in message and message.endswith("; remove the meshguard.io/status annotation from its pod template")


def test_the_injection_settings_decide_what_the_sidecar_should_be() -> None:
    pod = as_injected(app_pod(), settings=InjectionSettings(proxy_image="registry.example/envoy:1"))
    assert not mtls(pod)[0]  # this server injects another image
    assert mtls(pod, settings=Settings(injection={"proxy_image": "registry.example/envoy:1"}))[0]


def test_a_workload_whose_pods_the_injector_would_refuse_fails_before_any_pod_is_made() -> None:
    chosen = app_pod()
    chosen["metadata"]["annotations"] = {"meshguard.io/proxy-image": "attacker/envoy:1"}
    passed, message = mtls(template_of(chosen))
    assert not passed
    assert message.endswith("the injector will refuse its pods: annotation meshguard.io/proxy-image is not one the "
                            "platform lets pods set (injection.allowed_overrides); remove it")
    allowed = Settings(injection={"allowed_overrides": ["proxy-image"]})
    assert mtls(template_of(chosen), settings=allowed)[0]
    # An injected pod whose image the platform allowed passes; the same image without the allowance does not.
    injected = as_injected(chosen, settings=allowed.injection)
    assert mtls(injected, settings=allowed)[0] and not mtls(injected)[0]


# Probes of every kind the injector rewrites: their routes, health checks and clusters go into the proxy's
# bootstrap through the splice variables, on its plaintext readiness port.
PROBED = {"name": "app", "image": "shop/app:1", "ports": [{"name": "http", "containerPort": 8080}],
          "readinessProbe": {"httpGet": {"path": "/healthz?full=1", "port": "http", "scheme": "HTTPS",
                                          "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 2},
          "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 5},
          "startupProbe": {"grpc": {"port": 9090, "service": "app"}}}


def _probed(**injection: Any) -> tuple[dict[str, Any], Settings]:
    settings = Settings(injection=injection)
    return as_injected({**app_pod(), "spec": {"containers": [copy.deepcopy(PROBED)]}},
                       settings=settings.injection), settings


def _splice(pod: dict[str, Any], variable: str, edit: Any) -> dict[str, Any]:
    forged = copy.deepcopy(pod)
    for container in forged["spec"]["initContainers"] + forged["spec"]["containers"]:
        for entry in container.get("env", []):
            if entry["name"] == variable:
                entry["value"] = edit(entry["value"])
    return forged


@pytest.mark.parametrize("injection", [{}, {"bootstrap": "inline"}, {"native_sidecar": False}])
def test_the_probe_configuration_is_exactly_what_the_injector_writes_for_the_pods_probes(
        injection: dict[str, Any]) -> None:
    pod, settings = _probed(**injection)
    assert mtls(pod, settings=settings)[0]
    # A route of the tenant's own on the plaintext readiness port: the app, past mutual TLS.
    bypass = '{"match":{"prefix":"/"},"route":{"cluster":"probe|http|8080"}},'
    for forged in (_splice(pod, "MESHGUARD_PROBE_ROUTES", lambda value: bypass + value),
                   # the probe's cluster sent elsewhere, or a splice that is not JSON
                   _splice(pod, "MESHGUARD_PROBE_CLUSTERS", lambda value: value.replace("127.0.0.1", "10.0.0.9")),
                   _splice(pod, "MESHGUARD_PROBE_FILTERS", lambda value: value + "{"),
                   # the health check of another port than the probe's
                   _splice(pod, "MESHGUARD_PROBE_FILTERS", lambda value: value.replace("probe|tcp|8080",
                                                                                       "probe|tcp|8081"))):
        passed, message = mtls(forged, settings=settings)
        assert not passed and "a route of its own would reach the app past mutual TLS" in message, message


def test_the_splices_go_only_where_meshguard_puts_them_and_the_pod_identity_comes_from_the_downward_api() -> None:
    pod, settings = _probed()
    routes = next(e for e in pod["spec"]["initContainers"][0]["env"] if e["name"] == "MESHGUARD_PROBE_ROUTES")
    moved = _edit(pod, "meshguard-proxy", env=[routes])
    passed, message = mtls(moved, settings=settings)
    assert not passed and "meshguard-proxy container is not the one meshguard injects (it differs in env)" in message
    claimed = copy.deepcopy(pod)
    claimed["spec"]["initContainers"][0]["env"][1] = {"name": "POD_NAMESPACE", "value": "kube-system"}
    passed, message = mtls(claimed, settings=settings)
    assert not passed and "meshguard-init container is not the one meshguard injects (it differs in env)" in message

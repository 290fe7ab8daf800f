"""The app's probes, rewritten to the sidecar's readiness port, keep their meaning (webhook/injection/probes.py)."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from webhook import envoy
from webhook.injection.decision import INIT_NAME, PROXY_NAME
from webhook.injection.patch import plan
from webhook.injection.probes import rewrite, splices_problem
from webhook.injection.settings import InjectionSettings
from webhook.workloads import as_workload

EXCLUDED = (15090,)


def _app(**probes: Any) -> dict[str, Any]:
    return {"name": "web", "image": "shop/web:1", "ports": [{"name": "http", "containerPort": 8080}], **probes}


def _splices(out: Any) -> dict[str, list[dict[str, Any]]]:
    env = out.environment()
    return {key: json.loads("[" + env[variable].rstrip(",") + "]") for key, variable in envoy.SPLICES.items()}


def test_http_probe_goes_to_the_sidecar_with_its_path_headers_and_port_by_name() -> None:
    probe = {"httpGet": {"path": "/healthz?deep=1", "port": "http", "httpHeaders": [{"name": "X-A", "value": "1"}]},
             "periodSeconds": 3, "failureThreshold": 4, "timeoutSeconds": 2, "initialDelaySeconds": 5}
    out = rewrite({"containers": [_app(readinessProbe=probe)]}, 15021, EXCLUDED)
    ((index, field, new),) = out.probes
    assert (index, field) == (0, "readinessProbe")
    assert new == {"httpGet": {"path": "/app-health/web/readyz", "port": 15021, "scheme": "HTTP",
                               "httpHeaders": [{"name": "X-A", "value": "1"}]},
                   "periodSeconds": 3, "failureThreshold": 4, "timeoutSeconds": 2, "initialDelaySeconds": 5}
    parts = _splices(out)
    assert parts["routes"] == [{"match": {"path": "/app-health/web/readyz"},
                                "route": {"cluster": "probe|http|8080", "prefix_rewrite": "/healthz?deep=1",
                                          "timeout": "2s"}}]
    (cluster,) = parts["clusters"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert endpoint["socket_address"] == {"address": "127.0.0.1", "port_value": 8080}
    assert "transport_socket" not in cluster and parts["http_filters"] == []


def test_https_probe_is_checked_over_unverified_tls_like_the_kubelets() -> None:
    probe = {"httpGet": {"port": 8443, "scheme": "HTTPS"}}
    parts = _splices(rewrite({"containers": [_app(startupProbe=probe)]}, 15021, EXCLUDED))
    assert parts["routes"][0]["route"]["prefix_rewrite"] == "/"  # the kubelet's default path
    (cluster,) = parts["clusters"]
    assert cluster["name"] == "probe|https|8443"
    assert cluster["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    assert "validation_context" not in json.dumps(cluster)


def test_tcp_probes_become_a_connect_check_per_port_at_the_quickest_period() -> None:
    app = _app(livenessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 7, "timeoutSeconds": 2},
               readinessProbe={"tcpSocket": {"port": "http"}, "periodSeconds": 3})
    out = rewrite({"containers": [app]}, 15021, EXCLUDED)
    assert {field: new["httpGet"]["path"] for _, field, new in out.probes} == {
        "livenessProbe": "/app-health/web/livez", "readinessProbe": "/app-health/web/readyz"}
    assert all("tcpSocket" not in new for _, _, new in out.probes)
    parts = _splices(out)
    (cluster,) = parts["clusters"]
    (check,) = cluster["health_checks"]
    assert check["tcp_health_check"] == {} and check["interval"] == check["no_traffic_interval"] == "3s"
    paths = [f["typed_config"]["headers"][0]["string_match"]["exact"] for f in parts["http_filters"]]
    assert paths == ["/app-health/web/readyz", "/app-health/web/livez"]  # in PROBES order
    assert all(f["typed_config"]["cluster_min_healthy_percentages"] == {"probe|tcp|8080": {"value": 100}}
               for f in parts["http_filters"])


def test_grpc_probes_become_a_grpc_health_check_over_http2() -> None:
    app = _app(readinessProbe={"grpc": {"port": 9000}, "periodSeconds": 4},
               livenessProbe={"grpc": {"port": 9000, "service": "web.v1"}, "timeoutSeconds": 3})
    out = rewrite({"containers": [app]}, 15021, EXCLUDED)
    assert {field: new["httpGet"] for _, field, new in out.probes} == {
        "readinessProbe": {"path": "/app-health/web/readyz", "port": 15021, "scheme": "HTTP"},
        "livenessProbe": {"path": "/app-health/web/livez", "port": 15021, "scheme": "HTTP"}}
    assert all("grpc" not in new for _, _, new in out.probes)
    clusters = {c["name"]: c for c in _splices(out)["clusters"]}
    assert set(clusters) == {"probe|grpc|9000", "probe|grpc|9000|web.v1"}  # one per service asked about
    (ready,) = clusters["probe|grpc|9000"]["health_checks"]
    assert ready["grpc_health_check"] == {} and ready["interval"] == "4s" and "tcp_health_check" not in ready
    (live,) = clusters["probe|grpc|9000|web.v1"]["health_checks"]
    assert live["grpc_health_check"] == {"service_name": "web.v1"} and live["timeout"] == "3s"
    options = clusters["probe|grpc|9000"]["typed_extension_protocol_options"]
    assert list(options.values())[0]["explicit_http_config"] == {"http2_protocol_options": {}}


def test_probes_left_alone() -> None:
    containers = [
        _app(readinessProbe={"exec": {"command": ["true"]}}, livenessProbe={"grpc": {"port": 9100}},
             startupProbe={"httpGet": {"port": 9100}}),  # 9100 is excluded from capture below
        {"name": "named", "image": "x", "readinessProbe": {"httpGet": {"port": "no-such-port"}}},
    ]
    out = rewrite({"containers": containers}, 15021, (*EXCLUDED, 9100))
    assert out.probes == [] and set(out.environment().values()) == {""}


def _inject(pod: dict[str, Any], **settings: Any) -> dict[str, Any]:
    workload = as_workload(pod, "shop")
    assert workload is not None
    return jsonpatch.apply_patch(copy.deepcopy(pod), plan(workload, InjectionSettings(**settings), "meshguard").ops)


def _pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/ready", "port": 8080}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "annotations": annotations or {}},
            "spec": {"containers": [{"name": "side", "image": "x"}, _app(readinessProbe=probe)], **spec}}


def _proxy_env(pod: dict[str, Any]) -> dict[str, str]:
    """The environment the bootstrap is rendered with: meshguard-init's, or the proxy's when it is inline (an
    absent splice is empty)."""
    containers = pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
    (holder,) = [c for c in containers if c["name"] in (PROXY_NAME, INIT_NAME)
                 and "POD_NAME" in {e["name"] for e in c.get("env", ())}]
    return {**dict.fromkeys(envoy.SPLICES.values(), ""), **{e["name"]: e.get("value", "") for e in holder["env"]}}


def test_the_patch_rewrites_the_right_container_and_sets_the_proxys_splices_in_every_mode() -> None:
    classic = {"native_sidecar": False}
    for settings in ({}, classic, {**classic, "hold_application_until_proxy_starts": True},
                     {"bootstrap": "inline"}, {**classic, "bootstrap": "inline"}):
        injected = _inject(_pod(), **settings)
        (app,) = [c for c in injected["spec"]["containers"] if c["name"] == "web"]
        assert app["readinessProbe"]["httpGet"]["path"] == "/app-health/web/readyz", settings
        env = _proxy_env(injected)
        assert '"prefix_rewrite":"/ready"' in env["MESHGUARD_PROBE_ROUTES"], settings
        assert env["MESHGUARD_PROBE_FILTERS"] == "", settings


def test_a_pod_opts_out_with_the_annotation() -> None:
    injected = _inject(_pod({"meshguard.io/rewrite-app-probes": "false"}))
    (app,) = [c for c in injected["spec"]["containers"] if c["name"] == "web"]
    assert app["readinessProbe"] == {"httpGet": {"path": "/ready", "port": 8080}}
    assert set(_proxy_env(injected)[v] for v in envoy.SPLICES.values()) == {""}


def test_the_drain_fits_the_grace_period() -> None:
    def pre_stop(pod: dict[str, Any]) -> Any:
        (proxy,) = [c for c in pod["spec"]["initContainers"] if c["name"] == PROXY_NAME]
        return proxy.get("lifecycle", {}).get("preStop"), proxy["args"][proxy["args"].index("--drain-time-s") + 1]

    assert pre_stop(_inject(_pod())) == ({"sleep": {"seconds": 5}}, "5")  # default grace 30
    assert pre_stop(_inject(_pod(terminationGracePeriodSeconds=3))) == ({"sleep": {"seconds": 2}}, "2")
    assert pre_stop(_inject(_pod(terminationGracePeriodSeconds=0))) == (None, "0")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12)
_PROBE_LIKE = st.fixed_dictionaries({"httpGet": st.fixed_dictionaries(
    {"port": st.sampled_from([15021, 8080, "x"]), "path": st.sampled_from(["/app-health/web/readyz", "/x"])})})
_SPLICE_TEXT = st.one_of(st.text(max_size=30), st.lists(_JSON, max_size=3).map(
    lambda objects: "".join(json.dumps(o) + "," for o in objects)))


@hypothesis_settings(max_examples=300, deadline=None)
@given(containers=st.one_of(_JSON, st.lists(st.one_of(_JSON, st.fixed_dictionaries(
           {"name": st.just("web"), "readinessProbe": _PROBE_LIKE, "livenessProbe": _JSON})), max_size=3)),
       values=st.dictionaries(st.sampled_from(sorted(envoy.SPLICES.values())), _SPLICE_TEXT, max_size=3))
def test_judging_the_splices_of_any_pod_never_fails(containers: Any, values: dict[str, str]) -> None:
    """What a tenant writes into an injected pod is judged, never crashes the judge."""
    problem = splices_problem({"containers": containers}, values, 15021, (15090,))
    assert problem is None or problem.startswith("its probe configuration is not")


def test_the_splices_the_injector_writes_are_judged_its_own_and_nothing_else_is() -> None:
    injected = _inject(_pod())
    env = {k: v for k, v in _proxy_env(injected).items() if k in envoy.SPLICES.values()}
    assert env["MESHGUARD_PROBE_ROUTES"] and splices_problem(injected["spec"], env, 15021, (15090,)) is None
    unprobed = {"containers": [{"name": "web", "image": "x"}]}  # no probe they would be for
    assert splices_problem(unprobed, env, 15021, (15090,)) is not None



@pytest.mark.parametrize("probe", [{"httpGet": {"path": "/ready", "port": 8080}}, {"tcpSocket": {"port": 8080}}],
                         ids=["http", "tcp"])
def test_splices_a_tenant_bent_out_of_shape_are_judged_not_crashed_on(probe: dict[str, Any]) -> None:
    """A crash here reached the server's failure mode, which admits by default: each input below did."""
    pod = _pod()
    pod["spec"]["containers"][-1]["readinessProbe"] = probe
    injected = _inject(pod)
    env = {k: v for k, v in _proxy_env(injected).items() if k in envoy.SPLICES.values()}
    assert splices_problem(injected["spec"], env, 15021, (15090,)) is None
    superscript = {k: v.replace("|8080", "|\u00b2") for k, v in env.items()}  # isdigit() but not int()
    assert superscript != env
    assert splices_problem(injected["spec"], superscript, 15021, (15090,)) is not None
    deep = {**env, "MESHGUARD_PROBE_ROUTES": "[" * 5000 + "]" * 5000 + ","}
    assert splices_problem(injected["spec"], deep, 15021, (15090,)) is not None

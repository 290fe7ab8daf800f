"""``POST /mutate`` over real HTTPS: the patch the API server would apply, skips, denials, logs and metrics."""

from __future__ import annotations

import base64
import copy
from typing import Any

import httpx
import jsonpatch
import orjson
import pytest

from tests.conftest import RunningServer, review
from tests.fixtures.injection.podcheck import all_containers, pod_spec_problems, uninjected
from tests.unit.test_injection_overrides import INVALID
from webhook.injection.annotations import PLATFORM_ONLY
from webhook.injection.decision import INIT_NAME, PROXY_NAME, STATUS_ANNOTATION


def pod(**meta: Any) -> dict[str, Any]:
    """A pod the way a ReplicaSet creates it: generateName, no name, no namespace in the object."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-5d4f8-", "labels": {"app": "web"}, **meta},
            "spec": {"containers": [{"name": "web", "image": "shop/web:1", "ports": [{"containerPort": 8080}]}],
                     "serviceAccountName": "web"}}


def mutate(server: RunningServer, body: dict[str, Any]) -> dict[str, Any]:
    with server.client() as client:
        r = client.post("/mutate", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["response"]["uid"] == body["request"]["uid"]
    return answer["response"]


def applied(obj: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    return jsonpatch.apply_patch(obj, orjson.loads(base64.b64decode(response["patch"])))


def names(containers: list[dict[str, Any]] | None) -> list[str]:
    return [c["name"] for c in containers or []]


def admission_log(server: RunningServer, uid: str) -> dict[str, Any]:
    return server.admission_log(uid)


def test_injects_a_controller_pod_and_second_pass_is_a_no_op(server: RunningServer) -> None:
    original = pod()
    body = review(original, namespace="shop")
    response = mutate(server, body)
    result = applied(original, response)
    assert names(result["spec"]["initContainers"]) == [INIT_NAME, PROXY_NAME]
    assert names(result["spec"]["containers"]) == ["web"]
    assert pod_spec_problems(result["spec"]) == []
    assert uninjected(result, original) == original
    log = admission_log(server, body["request"]["uid"])
    assert (log["decision"], log["reason"], log["namespace"]) == ("patched", "injected", "shop")
    # A second call with the injected pod (reinvocationPolicy: IfNeeded, a re-applied pod): nothing more happens.
    again = review(result, namespace="shop")
    second = mutate(server, again)
    assert second["allowed"] is True and "patch" not in second
    assert admission_log(server, again["request"]["uid"])["reason"] == "already-injected"


def test_dry_run_gets_the_same_patch(server: RunningServer) -> None:
    real = mutate(server, review(pod(), namespace="shop"))
    dry = mutate(server, review(pod(), namespace="shop", dry_run=True))
    assert dry["patch"] == real["patch"]


@pytest.mark.parametrize(("meta", "spec", "namespace", "reason"), [
    ({"labels": {"meshguard.io/inject": "false"}}, {}, "shop", "opt-out-label"),
    ({"annotations": {"meshguard.io/inject": "false"}}, {}, "shop", "opt-out-annotation"),
    ({}, {"hostNetwork": True}, "shop", "host-network"),
    ({}, {}, "kube-system", "system-namespace"),
    ({}, {}, "meshguard", "own-namespace"),
    ({"namespace": "kube-public"}, {}, "kube-public", "system-namespace"),
])
def test_skips_carry_their_reason_to_log_and_metrics(server: RunningServer, meta: dict[str, Any],
                                                     spec: dict[str, Any], namespace: str, reason: str) -> None:
    obj = pod(**meta)
    obj["spec"].update(spec)
    body = review(obj, namespace=namespace)
    response = mutate(server, body)
    assert response["allowed"] is True and "patch" not in response
    assert admission_log(server, body["request"]["uid"])["reason"] == reason
    metrics = httpx.get(f"{server.health_url}/metrics").text
    assert f'meshguard_injections_total{{reason="{reason}",result="skipped"}}' in metrics


@pytest.mark.parametrize(("operation", "obj", "old"), [
    ("UPDATE", pod(), pod()),
    ("DELETE", None, pod()),
    ("CREATE", {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                "spec": {"template": pod()}}, None),
    ("CREATE", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}}, None),
])
def test_other_requests_are_allowed_unchanged(server: RunningServer, operation: str, obj: dict[str, Any] | None,
                                              old: dict[str, Any] | None) -> None:
    body = review(obj, operation=operation, old=old, namespace="shop")
    response = mutate(server, body)
    assert response["allowed"] is True and "patch" not in response
    assert admission_log(server, body["request"]["uid"])["reason"] == "not-a-pod-create"


def test_invalid_override_is_denied_with_400_naming_the_annotation(server: RunningServer) -> None:
    body = review(pod(annotations={"meshguard.io/proxy-cpu": "fast", "meshguard.io/log-level": "loud"}),
                  namespace="shop")
    response = mutate(server, body)
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["code"] == 400
    message = response["status"]["message"]
    assert message.startswith("meshguard cannot inject the sidecar into Pod shop/web-5d4f8-*: ")
    assert 'annotation meshguard.io/proxy-cpu: "fast" is invalid; expected a CPU quantity such as 100m' in message
    assert 'annotation meshguard.io/log-level: "loud" is invalid; expected one of trace, debug' in message
    assert "\n" not in message
    metrics = httpx.get(f"{server.health_url}/metrics").text
    assert 'meshguard_injections_total{reason="invalid-override",result="denied"}' in metrics


def test_every_invalid_override_is_named_in_one_denial(server: RunningServer) -> None:
    bad = {f"meshguard.io/{name}": value for name, value, _ in INVALID}  # the last invalid value of each
    response = mutate(server, review(pod(annotations=bad), namespace="shop"))
    assert response["allowed"] is False and response["status"]["code"] == 400
    message = response["status"]["message"]
    for annotation, value in bad.items():
        if annotation.removeprefix("meshguard.io/") in PLATFORM_ONLY:  # refused whatever its value
            assert f"annotation {annotation} is not one the platform lets pods set" in message
        else:
            assert f'annotation {annotation}: "{value}" is invalid; expected ' in message
    assert "\n" not in message


@pytest.mark.parametrize(("where", "item"), [
    ("initContainers", {"name": INIT_NAME, "image": "mine"}),
    ("volumes", {"name": "meshguard-envoy", "emptyDir": {}}),
])
def test_a_pod_using_a_reserved_name_is_denied_not_broken(server: RunningServer, where: str,
                                                          item: dict[str, Any]) -> None:
    obj = pod()
    obj["spec"][where] = [item]
    response = mutate(server, review(obj, namespace="shop"))
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["code"] == 400
    assert f"already uses the name(s) {item['name']}, which meshguard reserves" in response["status"]["message"]
    metrics = httpx.get(f"{server.health_url}/metrics").text
    assert 'meshguard_injections_total{reason="name-conflict",result="denied"}' in metrics


def test_valid_overrides_over_the_wire(server: RunningServer) -> None:
    original = pod(annotations={"meshguard.io/native-sidecar": "false", "meshguard.io/proxy-memory": "64Mi",
                                "meshguard.io/exclude-outbound-ports": "5432"})
    result = applied(original, mutate(server, review(original, namespace="shop")))
    assert names(result["spec"]["containers"]) == ["web", PROXY_NAME]
    assert result["spec"]["containers"][1]["resources"]["requests"]["memory"] == "64Mi"
    init_args = result["spec"]["initContainers"][0]["args"]
    assert init_args[init_args.index("--exclude-outbound-ports") + 1] == "5432"


def test_big_pod_with_many_containers_and_env_vars(server: RunningServer) -> None:
    original = pod()
    env = [{"name": f"VAR_{i}", "value": "x" * 20} for i in range(2000)]
    original["spec"]["containers"] = [{"name": f"c{i}", "image": "img", "env": copy.deepcopy(env) if i == 0 else []}
                                      for i in range(50)]
    result = applied(original, mutate(server, review(original, namespace="shop")))
    assert names(all_containers(result["spec"])).count(PROXY_NAME) == 1  # type: ignore[arg-type]
    assert result["spec"]["containers"][0]["env"] == env
    assert result["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "c0"


@pytest.mark.parametrize("spec", [{"containers": "nope"}, {"containers": [1, None]}, "spec", None,
                                  {"containers": [], "initContainers": {"x": 1}, "volumes": 7}])
def test_odd_pods_never_produce_a_server_error(server: RunningServer, spec: Any) -> None:
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "odd", "annotations": "x"}, "spec": spec}
    response = mutate(server, review(obj, namespace="shop"))
    if response["allowed"]:
        applied(obj, response)  # whatever it answers applies cleanly to exactly this object
    assert response.get("status", {}).get("code") != 500


def test_classic_mode_by_config(server_factory: Any) -> None:
    srv = server_factory(config={"injection": {"native_sidecar": False, "hold_application_until_proxy_starts": True,
                                               "proxy_image": "mirror.local/envoy:v1.31.2"}})
    original = pod()
    result = applied(original, mutate(srv, review(original, namespace="shop")))
    assert names(result["spec"]["initContainers"]) == [INIT_NAME]
    assert names(result["spec"]["containers"]) == [PROXY_NAME, "web"]
    assert result["spec"]["containers"][0]["image"] == "mirror.local/envoy:v1.31.2"
    assert "postStart" in result["spec"]["containers"][0]["lifecycle"]
    assert orjson.loads(result["metadata"]["annotations"][STATUS_ANNOTATION])["containers"] == [PROXY_NAME]


def test_bad_injection_config_stops_the_server_at_startup(server_factory: Any) -> None:
    with pytest.raises(RuntimeError, match="proxy_cpu"):
        server_factory(config={"injection": {"proxy_cpu": "lots"}})

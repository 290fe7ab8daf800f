"""Injection rules, table-driven: each case applies the patch with jsonpatch and checks the resulting pod."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import jsonpatch
import orjson
import pytest

from tests.fixtures.injection.podcheck import pod_spec_problems, uninjected
from webhook import envoy
from webhook.cli import build_parser
from webhook.injection import spec as spec_module
from webhook.injection.decision import INIT_NAME, PROXY_NAME, STATUS_ANNOTATION
from webhook.injection.patch import escape, patch_ops, plan
from webhook.injection.settings import InjectionSettings
from webhook.injection.spec import BOOTSTRAP_FILE, build
from webhook.service import serves_sleep_action
from webhook.workloads import as_workload

DEFAULTS = InjectionSettings()
CLASSIC = InjectionSettings(native_sidecar=False)


def pod(*, annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None,
        **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"generateName": "web-7d9f-"}
    if annotations is not None:
        meta["annotations"] = annotations
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "app", "image": "shop/web:1"}], **spec}}


def inject(obj: dict[str, Any], settings: InjectionSettings = DEFAULTS, namespace: str = "shop") -> dict[str, Any]:
    """Plan, apply with jsonpatch, and check the invariants every injected pod must meet."""
    workload = as_workload(obj, namespace)
    assert workload is not None
    outcome = plan(workload, settings, "meshguard")
    assert outcome.decision.inject, outcome.decision
    result = jsonpatch.apply_patch(obj, outcome.ops)
    assert pod_spec_problems(result["spec"]) == []
    assert uninjected(result, obj) == obj
    again = as_workload(result, namespace)
    assert again is not None and plan(again, settings, "meshguard").ops == []
    return result


def names(containers: list[dict[str, Any]] | None) -> list[str]:
    return [c["name"] for c in containers or []]


def proxy_of(result: dict[str, Any]) -> dict[str, Any]:
    spec = result["spec"]
    (proxy,) = [c for c in (spec.get("initContainers") or []) + spec["containers"] if c["name"] == PROXY_NAME]
    return proxy


def init_of(result: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in result["spec"]["initContainers"] if c["name"] == INIT_NAME)


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


# -- placement -----------------------------------------------------------------------------------------------------

PLACEMENT = [
    # (case, pod, settings, initContainers after, containers after)
    ("native default", pod(), DEFAULTS, [INIT_NAME, PROXY_NAME], ["app"]),
    ("native keeps app init containers after the proxy",
     pod(initContainers=[{"name": "migrate", "image": "m"}]), DEFAULTS, [INIT_NAME, PROXY_NAME, "migrate"], ["app"]),
    ("classic by config", pod(), CLASSIC, [INIT_NAME], ["app", PROXY_NAME]),
    ("classic by annotation", pod(annotations={"meshguard.io/native-sidecar": "false"}), DEFAULTS,
     [INIT_NAME], ["app", PROXY_NAME]),
    ("native by annotation over classic config", pod(annotations={"meshguard.io/native-sidecar": "true"}), CLASSIC,
     [INIT_NAME, PROXY_NAME], ["app"]),
    ("classic with existing init containers", pod(initContainers=[{"name": "a", "image": "a"}]), CLASSIC,
     [INIT_NAME, "a"], ["app", PROXY_NAME]),
    ("hold puts the proxy first", pod(annotations={"meshguard.io/hold-application-until-proxy-starts": "true"}),
     CLASSIC, [INIT_NAME], [PROXY_NAME, "app"]),
    ("hold by config", pod(), InjectionSettings(native_sidecar=False, hold_application_until_proxy_starts=True),
     [INIT_NAME], [PROXY_NAME, "app"]),
    ("hold is moot in native mode", pod(annotations={"meshguard.io/hold-application-until-proxy-starts": "true"}),
     DEFAULTS, [INIT_NAME, PROXY_NAME], ["app"]),
    ("two app containers, classic", pod(containers=[{"name": "a", "image": "a"}, {"name": "b", "image": "b"}]),
     CLASSIC, [INIT_NAME], ["a", "b", PROXY_NAME]),
    ("bootstrap inline", pod(), InjectionSettings(bootstrap="inline"), [INIT_NAME, PROXY_NAME], ["app"]),
]


@pytest.mark.parametrize(("obj", "settings", "init_after", "containers_after"),
                         [case[1:] for case in PLACEMENT], ids=[case[0] for case in PLACEMENT])
def test_placement(obj: dict[str, Any], settings: InjectionSettings, init_after: list[str],
                   containers_after: list[str]) -> None:
    result = inject(obj, settings)
    assert names(result["spec"]["initContainers"]) == init_after
    assert names(result["spec"]["containers"]) == containers_after
    status = orjson.loads(result["metadata"]["annotations"][STATUS_ANNOTATION])
    assert status["initContainers"] == [n for n in init_after if n.startswith("meshguard-")]
    assert status["containers"] == [n for n in containers_after if n.startswith("meshguard-")]
    assert status["volumes"] == ["meshguard-envoy", "meshguard-certs"]
    assert status["version"]


def test_native_sidecar_restarts_always_and_gates_the_app_on_a_startup_probe() -> None:
    proxy = proxy_of(inject(pod()))
    assert proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"]["httpGet"] == {"path": spec_module.READY_PATH, "port": 15021}
    assert proxy["readinessProbe"]["httpGet"] == {"path": spec_module.READY_PATH, "port": 15021}
    assert "postStart" not in proxy.get("lifecycle", {})


def test_classic_proxy_has_no_restart_policy_and_no_startup_probe() -> None:
    proxy = proxy_of(inject(pod(), CLASSIC))
    assert "restartPolicy" not in proxy and "startupProbe" not in proxy
    assert "postStart" not in proxy["lifecycle"]


def test_hold_waits_in_post_start() -> None:
    result = inject(pod(annotations={"meshguard.io/hold-application-until-proxy-starts": "true"}), CLASSIC)
    proxy = result["spec"]["containers"][0]
    assert proxy["lifecycle"]["postStart"]["exec"]["command"] == spec_module.hold_command()
    # kubectl logs/exec must still land in the app, not in the proxy that now comes first.
    assert result["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"


# -- creating what is missing ----------------------------------------------------------------------------------------

MISSING = [
    ("no annotations key", pod()),
    ("annotations null", {**pod(), "metadata": {"name": "web", "annotations": None}}),
    ("no metadata at all", {"kind": "Pod", "spec": {"containers": [{"name": "app", "image": "x"}]}}),
    ("initContainers null", pod(initContainers=None)),
    ("volumes null", pod(volumes=None)),
    ("existing volumes", pod(volumes=[{"name": "data", "emptyDir": {}}])),
    ("existing annotations", pod(annotations={"team": "shop", "a~b/c": "x"})),
]


@pytest.mark.parametrize("obj", [case[1] for case in MISSING], ids=[case[0] for case in MISSING])
@pytest.mark.parametrize("settings", [DEFAULTS, CLASSIC], ids=["native", "classic"])
def test_creates_missing_keys_and_keeps_existing_ones(obj: dict[str, Any], settings: InjectionSettings) -> None:
    result = inject(obj, settings)
    annotations = result["metadata"]["annotations"]
    assert STATUS_ANNOTATION in annotations
    assert annotations["kubectl.kubernetes.io/default-container"] == "app"
    for key, value in ((obj.get("metadata") or {}).get("annotations") or {}).items():
        assert annotations[key] == value
    volumes = names(result["spec"]["volumes"])
    assert volumes[-2:] == ["meshguard-envoy", "meshguard-certs"]
    assert volumes[:-2] == names(obj["spec"].get("volumes"))


def test_template_without_spec_gets_one() -> None:
    template = {"metadata": {"labels": {"app": "x"}}}
    ops = patch_ops(template, build(CLASSIC))
    result = jsonpatch.apply_patch(template, ops)
    assert names(result["spec"]["containers"]) == [PROXY_NAME]
    assert names(result["spec"]["initContainers"]) == [INIT_NAME]
    assert "kubectl.kubernetes.io/default-container" not in result["metadata"]["annotations"]


def test_user_default_container_annotation_is_kept() -> None:
    result = inject(pod(annotations={"kubectl.kubernetes.io/default-container": "sidecar-logger"},
                        containers=[{"name": "app", "image": "a"}, {"name": "sidecar-logger", "image": "l"}]))
    assert result["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "sidecar-logger"


def test_json_pointer_escaping() -> None:
    assert escape("meshguard.io/status") == "meshguard.io~1status"
    assert escape("a~/b") == "a~0~1b"
    ops = plan(as_workload(pod(annotations={}), "shop"), DEFAULTS, "meshguard").ops  # type: ignore[arg-type]
    paths = [op["path"] for op in ops]
    assert "/metadata/annotations/meshguard.io~1status" in paths
    assert "/metadata/annotations/kubectl.kubernetes.io~1default-container" in paths
    assert all(op["op"] == "add" for op in ops)


def test_unknown_fields_managed_fields_and_other_webhooks_containers_are_preserved() -> None:
    obj = pod(initContainers=[{"name": "vault-agent-init", "image": "other", "futureField": {"x": 1}}],
              futureSpecField={"enabled": True}, os={"name": "linux"})
    obj["metadata"]["managedFields"] = [{"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:spec": {}}}]
    obj["status"] = {"phase": "Pending"}
    ops = plan(as_workload(obj, "shop"), DEFAULTS, "meshguard").ops  # type: ignore[arg-type]
    assert not any("managedFields" in op["path"] or op["path"].split("/")[1] == "status" for op in ops)
    result = inject(obj)
    assert result["spec"]["futureSpecField"] == {"enabled": True}
    assert result["spec"]["initContainers"][2]["futureField"] == {"x": 1}
    assert result["metadata"]["managedFields"] == obj["metadata"]["managedFields"]


def test_patch_applies_to_controller_templates_at_their_pointer() -> None:
    cronjob = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "report", "namespace": "shop"},
               "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": {"spec": {
                   "restartPolicy": "OnFailure", "containers": [{"name": "report", "image": "r"}]}}}}}}
    workload = as_workload(cronjob, "default")
    assert workload is not None
    ops = plan(workload, DEFAULTS, "meshguard").ops
    assert all(op["path"].startswith("/spec/jobTemplate/spec/template/") for op in ops)
    result = jsonpatch.apply_patch(cronjob, ops)
    template = result["spec"]["jobTemplate"]["spec"]["template"]
    assert names(template["spec"]["initContainers"]) == [INIT_NAME, PROXY_NAME]
    assert STATUS_ANNOTATION in template["metadata"]["annotations"]


# -- what is injected ------------------------------------------------------------------------------------------------

def test_init_container_args_and_security_context() -> None:
    obj = pod(securityContext={"runAsNonRoot": True, "runAsUser": 1000})
    init = init_of(inject(obj))
    assert init["image"] == DEFAULTS.init_image
    assert init["args"][:13] == ["netinit", "--cert-dir", "/etc/meshguard/certs", "--sds-dir",
                                 "/var/run/meshguard/sds", "--proxy-uid", "1337", "--inbound-port", "15006",
                                 "--outbound-port", "15001", "--exclude-inbound-ports", "15021,15090"]
    # Then the bootstrap it renders (every outbound destination captured: netinit's default, not written).
    assert init["args"][13:15] == ["--bootstrap-out", BOOTSTRAP_FILE]
    # It writes the proxy's SDS files into the volume the two share.
    assert init["volumeMounts"] == [{"name": "meshguard-envoy", "mountPath": "/var/run/meshguard"}]
    sc = init["securityContext"]
    assert sorted(sc["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    # The pod says runAsNonRoot; the container-level values must override it for iptables to work.
    assert (sc["runAsUser"], sc["runAsNonRoot"]) == (0, False)
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True


# What the container rendering the bootstrap gets: the Downward API's fields (inline, also the empty probe splices).
DOWNWARD_ENV = {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_IP": "status.podIP",
                "SERVICE_ACCOUNT": "spec.serviceAccountName"}
INLINE = InjectionSettings(bootstrap="inline")


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] if "valueFrom" in e else e["value"]
            for e in container["env"]}


def test_proxy_container_with_its_bootstrap_inline() -> None:
    proxy = proxy_of(inject(pod(), INLINE))
    assert proxy["image"] == DEFAULTS.proxy_image
    args = proxy["args"]
    expected = envoy.render(envoy.BootstrapOptions())
    assert flag(args, "--config-yaml") == expected
    splices = dict.fromkeys(envoy.SPLICES.values(), "")
    assert _env(proxy) == {**DOWNWARD_ENV, **splices, "MESHGUARD_INBOUND_MTLS": "STRICT"}
    assert [p["containerPort"] for p in proxy["ports"]] == [15090]
    sc = proxy["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (1337, 1337, True)
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert proxy["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                  "limits": {"cpu": "2", "memory": "1Gi"}}
    assert proxy["lifecycle"]["preStop"] == {"sleep": {"seconds": DEFAULTS.drain_seconds}}
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    assert mounts["meshguard-certs"] == envoy.BootstrapOptions().cert_dir


@pytest.mark.parametrize(("version", "sleeps"), [
    ({"major": "1", "minor": "30"}, True), ({"major": "1", "minor": "37"}, True),
    ({"major": "1", "minor": "29"}, False), ({"major": "1", "minor": "29+"}, False),  # a managed cluster's
    ({"major": "1", "minor": "31+"}, True), ({}, True),  # unreadable: taken as recent
])
def test_the_drain_sleep_only_where_the_api_server_accepts_it(version: dict[str, str], sleeps: bool) -> None:
    assert serves_sleep_action(version) is sleeps
    settings = InjectionSettings(prestop_sleep=serves_sleep_action(version))
    lifecycle = proxy_of(inject(pod(), settings)).get("lifecycle", {})
    # On 1.29 the API server refuses a pod with the sleep action: no preStop at all there.
    assert ("preStop" in lifecycle) is sleeps


def test_meshguard_init_renders_the_bootstrap() -> None:
    """It renders the bootstrap into the volume the proxy reads it from, from the settings' options and the pod's
    Downward API fields; the proxy's arguments then name the file instead of carrying the bootstrap."""
    settings = InjectionSettings(mtls_mode="PERMISSIVE", mesh_cidrs=("10.0.0.0/8",))
    injected = inject(pod(annotations={"meshguard.io/log-level": "debug"}), settings)
    init = next(c for c in injected["spec"]["initContainers"] if c["name"] == INIT_NAME)
    args = build_parser().parse_args(init["args"])
    assert args.bootstrap_out == Path(BOOTSTRAP_FILE)
    expected = envoy.BootstrapOptions(mtls_mode="PERMISSIVE", mesh_cidrs=("10.0.0.0/8",))
    assert envoy.options_from(args) == expected
    assert _env(init) == DOWNWARD_ENV  # no probes to splice
    proxy = proxy_of(injected)
    assert flag(proxy["args"], "--config-path") == BOOTSTRAP_FILE and "--config-yaml" not in proxy["args"]
    assert flag(proxy["args"], "--log-level") == "debug"
    # The pod's identity is in the rendered file; the proxy only says which inbound modes it enforces.
    assert _env(proxy) == {"MESHGUARD_INBOUND_MTLS": "PERMISSIVE"}
    shared = {m["name"] for m in init["volumeMounts"]} & {m["name"] for m in proxy["volumeMounts"]}
    assert shared == {"meshguard-envoy"}
    # The point of it: the pod object carries kilobytes less than with the bootstrap inline.
    assert len(orjson.dumps(injected)) < len(orjson.dumps(inject(pod(), INLINE))) - 5000


def test_volumes() -> None:
    volumes = {v["name"]: v for v in inject(pod())["spec"]["volumes"]}
    assert volumes["meshguard-envoy"]["emptyDir"] == {"medium": "Memory"}
    assert volumes["meshguard-certs"]["secret"]["secretName"] == DEFAULTS.cert_secret
    custom = inject(pod(), InjectionSettings(cert_secret="shop-mesh-cert"))
    assert {v["name"]: v for v in custom["spec"]["volumes"]}["meshguard-certs"]["secret"]["secretName"] == \
        "shop-mesh-cert"


@pytest.mark.parametrize(("spec", "account"), [({"serviceAccountName": "payments"}, "payments"),
                                                 ({"serviceAccount": "legacy"}, "legacy"), ({}, "default")])
def test_with_secrets_per_account_each_proxy_mounts_its_service_accounts(spec: dict[str, str], account: str) -> None:
    injected = inject(pod(**spec), InjectionSettings(cert_secret_per_account=True))
    volume = {v["name"]: v for v in injected["spec"]["volumes"]}["meshguard-certs"]
    assert volume["secret"] == {"secretName": f"meshguard-identity-{account}", "defaultMode": 0o444}


def test_with_the_signer_each_proxy_mounts_its_own_pod_certificate_and_the_mesh_trust_bundle() -> None:
    injected = inject(pod(), InjectionSettings(pod_certificate_signer="meshguard.io/workload"))
    volume = {v["name"]: v for v in injected["spec"]["volumes"]}["meshguard-certs"]
    assert "secret" not in volume
    # The same file names the Envoy bootstrap reads from the Secret: tls.crt, tls.key, ca.crt.
    assert volume["projected"] == {"defaultMode": 0o444, "sources": [
        {"podCertificate": {"signerName": "meshguard.io/workload", "keyType": "ECDSAP256", "keyPath": "tls.key",
                            "certificateChainPath": "tls.crt"}},
        {"clusterTrustBundle": {"name": "meshguard.io:workload:mesh-ca", "path": "ca.crt"}}]}


def test_no_drain_means_no_pre_stop() -> None:
    assert "lifecycle" not in proxy_of(inject(pod(), InjectionSettings(drain_seconds=0)))


# -- per-pod overrides -----------------------------------------------------------------------------------------------

OVERRIDES = [
    ("proxy-cpu", "250m", lambda r: proxy_of(r)["resources"]["requests"]["cpu"], "250m"),
    ("proxy-memory", "64Mi", lambda r: proxy_of(r)["resources"]["requests"]["memory"], "64Mi"),
    ("proxy-cpu-limit", "500m", lambda r: proxy_of(r)["resources"]["limits"]["cpu"], "500m"),
    ("proxy-memory-limit", "256Mi", lambda r: proxy_of(r)["resources"]["limits"]["memory"], "256Mi"),
    ("proxy-image", "registry.example:5000/mesh/envoy:v1.32.0", lambda r: proxy_of(r)["image"],
     "registry.example:5000/mesh/envoy:v1.32.0"),
    ("log-level", "debug", lambda r: flag(proxy_of(r)["args"], "--log-level"), "debug"),
    ("exclude-inbound-ports", "8081, 9090", lambda r: flag(init_of(r)["args"], "--exclude-inbound-ports"),
     "15021,15090,8081,9090"),
    ("exclude-outbound-ports", "5432,6379", lambda r: flag(init_of(r)["args"], "--exclude-outbound-ports"),
     "5432,6379"),
    ("include-outbound-ip-ranges", "10.0.0.0/8,172.16.0.0/12",
     lambda r: flag(init_of(r)["args"], "--include-outbound-ip-ranges"), "10.0.0.0/8,172.16.0.0/12"),
    ("exclude-outbound-ip-ranges", "169.254.169.254/32,fd00::/8",
     lambda r: flag(init_of(r)["args"], "--exclude-outbound-ip-ranges"), "169.254.169.254/32,fd00::/8"),
    ("native-sidecar", "false", lambda r: names(r["spec"]["containers"])[-1], PROXY_NAME),
]


@pytest.mark.parametrize(("name", "value", "read", "expected"), OVERRIDES, ids=[case[0] for case in OVERRIDES])
def test_override(name: str, value: str, read: Any, expected: Any) -> None:
    assert read(inject(pod())) != expected
    settings = InjectionSettings(allowed_overrides=(name,))
    assert read(inject(pod(annotations={f"meshguard.io/{name}": value}), settings)) == expected


def test_log_level_override_reaches_the_proxy() -> None:
    proxy = proxy_of(inject(pod(annotations={"meshguard.io/log-level": "debug"})))
    assert flag(proxy["args"], "--log-level") == "debug"


def test_specs_are_built_once_per_distinct_settings() -> None:
    assert build(InjectionSettings()) is build(InjectionSettings())
    first = plan(as_workload(pod(), "shop"), DEFAULTS, "meshguard").ops  # type: ignore[arg-type]
    second = plan(as_workload(pod(), "other"), DEFAULTS, "meshguard").ops  # type: ignore[arg-type]
    assert first == second


class _Readiness(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first two probes, then 200: an Envoy that becomes ready."""

    probes = 0

    def do_GET(self) -> None:
        type(self).probes += 1
        ok = self.path == spec_module.READY_PATH and type(self).probes > 2
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.skipif(shutil.which("bash") is None, reason="the hold command runs in bash")
def test_hold_command_waits_until_ready_and_gives_up_when_never_ready() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Readiness)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert subprocess.run(spec_module.hold_command(port=port, tries=20), timeout=60).returncode == 0
        assert _Readiness.probes == 3
        never = spec_module.hold_command(port=port, path="/not-ready", tries=2)
        assert subprocess.run(never, timeout=60).returncode == 1
    finally:
        server.shutdown()
        server.server_close()

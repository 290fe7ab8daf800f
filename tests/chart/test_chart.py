"""The Helm chart, rendered by a real helm: lint, schema, and the properties a platform team relies on.

Every rendered object of a matrix of values is validated against the Kubernetes OpenAPI schemas (strict: no
unknown fields); the CRD kinds (cert-manager, Prometheus Operator) have no schema there and get their fields
asserted instead. Webhook selectors are evaluated with Kubernetes label-selector semantics against namespaces
and pods, so the tests say which pods are injected, not just which YAML was written.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from tests.chart.conftest import CHART, FULLNAME, NAMESPACE, RELEASE, Render, RenderError, find, kinds, run_helm
from tests.unit.test_selfcert import handshake
from webhook import __version__, certs, config
from webhook.injection.decision import PROXY_NAME
from webhook.metrics import Metrics
from webhook.namespaces import SYSTEM_NAMESPACES
from webhook.policy.handler import EPHEMERAL
from webhook.policy.selectors import parse_selector
from webhook.workloads import WORKLOAD_KINDS

CRD_KINDS = {"Certificate", "Issuer", "ServiceMonitor"}
K8S_VERSION = kubernetes_validate.utils.latest_version()
ISSUER = {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
INFRA_NODES = {"nodeSelectorTerms": [{"matchExpressions": [{"key": "role", "operator": "In", "values": ["infra"]}]}]}
CA_BUNDLE = base64.b64encode(certs.generate_ca().cert_pem()).decode()

MATRIX: dict[str, dict[str, Any]] = {
    "defaults": {},
    "helm": {"certificates": {"mode": "helm"}},
    "cert-manager": {"certificates": {"mode": "certManager"},
                     "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                                 "dashboard": {"enabled": True, "namespace": "monitoring"}}},
    "cert-manager-issuer": {"certificates": {"mode": "certManager", "certManager": {"issuerRef": ISSUER}}},
    "url": {"webhooks": {"url": "https://dev.example.com:8443/", "caBundle": CA_BUNDLE}},
    "strict": {"podAntiAffinity": "hard", "replicaCount": 5, "webhooks": {
        "excludeNamespaces": ["monitoring"],
        "injection": {"failurePolicy": "Ignore", "timeoutSeconds": 10, "reinvocationPolicy": "IfNeeded"},
        "validation": {"failurePolicy": "Fail", "timeoutSeconds": 30,
                       "namespaceMatchExpressions": [{"key": "team", "operator": "Exists"}]}}},
    "single": {"replicaCount": 1, "podAntiAffinity": "none", "priorityClassName": "", "topologySpreadConstraints": [],
               "rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing"},
               "metrics": {"service": False}, "image": {"digest": "sha256:" + "a" * 64}},
    "overrides": {"fullnameOverride": "guard", "imagePullSecrets": [{"name": "regcred"}],
                  "nodeSelector": {"kubernetes.io/os": "linux"},
                  "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
                  "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": INFRA_NODES}},
                  "podAnnotations": {"team": "platform"}, "podLabels": {"tier": "control"},
                  "serviceAccount": {"annotations": {"iam": "role"}},
                  "config": {"log_level": "debug", "server": {"port": 9443, "health_port": 9090},
                             "injection": {"proxy_image": "envoyproxy/envoy:v1.32.0"}}},
}


def _webhook_configs(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    return find(objects, "MutatingWebhookConfiguration"), find(objects, "ValidatingWebhookConfiguration")


def _server_config(objects: list[dict[str, Any]], tmp_path: Path) -> config.Settings:
    """The ConfigMap's config.yaml loaded by the server's own loader: unknown or invalid keys fail here."""
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap" and "config.yaml" in o["data"]]
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    return config.load(path)


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


# --- the chart as a whole ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(MATRIX))
def test_lint(helm: str, case: str) -> None:
    out = run_helm(helm, "lint", str(CHART), "--strict", "--namespace", NAMESPACE, values=MATRIX[case])
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_object_is_valid_and_labeled(render: Render, case: str) -> None:
    objects = render(MATRIX[case])
    assert objects
    for obj in objects:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] not in CRD_KINDS:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{what}: {'.'.join(map(str, exc.path))}: {exc.message}")
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "meshguard", what
        assert labels["app.kubernetes.io/instance"] == RELEASE, what
        assert labels["app.kubernetes.io/managed-by"] == "Helm", what
        assert labels["app.kubernetes.io/version"] and labels["helm.sh/chart"].startswith("meshguard-"), what


def test_default_install_renders_exactly_these_objects(render: Render) -> None:
    assert kinds([o for o in render() if "helm.sh/hook" not in o["metadata"].get("annotations", {})]) == [
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "MutatingWebhookConfiguration",
        "PodDisruptionBudget", "Role", "RoleBinding", "Secret", "Secret", "Service", "Service", "ServiceAccount",
        "ValidatingWebhookConfiguration",
    ]


def test_the_mesh_ca_secret_is_kept_on_uninstall_and_named_in_the_config(render: Render, tmp_path: Path) -> None:
    objects = render()
    settings = _server_config(objects, tmp_path).identity
    secret = find(objects, "Secret", settings.ca_secret)
    # The running proxies trust this CA: deleting it with the release would strand them.
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" and "data" not in secret
    assert (settings.mode, settings.signer_name) == ("auto", "meshguard.io/workload")
    off = render({"identity": {"mode": "static"}})
    assert not [o for o in off if o["kind"] == "Secret" and o["metadata"]["name"] == settings.ca_secret]
    assert _server_config(off, tmp_path).identity.mode == "static"
    # Secrets per ServiceAccount are issued from the same CA.
    assert find(render({"identity": {"mode": "secret"}}), "Secret", settings.ca_secret)


@pytest.mark.parametrize(("case", "expected"), [
    ("defaults", "fills the webhooks' caBundle itself"),
    ("helm", "a `helm upgrade` within\n90 days of its expiry renews it"),
    ("cert-manager", "cert-manager issues the certificate"),
    ("url", "no server runs in the cluster"),
])
def test_notes_say_what_to_label_next(helm: str, case: str, expected: str) -> None:
    out = run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                   values=MATRIX[case])
    notes = out[out.index("NOTES:"):]
    assert "kubectl label namespace <namespace> meshguard.io/inject=enabled" in notes
    assert expected in notes and f"helm test {RELEASE} -n {NAMESPACE}" in notes


@pytest.mark.parametrize(("values", "error"), [
    ({"webhooks": {"injection": {"timeoutSeconds": 31}}}, "maximum: got 31, want 30"),
    ({"webhooks": {"validation": {"timeoutSeconds": 0}}}, "minimum: got 0, want 1"),
    ({"webhooks": {"injection": {"failurePolicy": "Maybe"}}}, "failurePolicy"),
    ({"certificates": {"mode": "vault"}}, "/certificates/mode"),
    ({"podAntiAffinity": "sometimes"}, "/podAntiAffinity"),
    ({"replicas": 3}, "additional properties 'replicas' not allowed"),
    ({"webhooks": {"injection": {"timeout": 5}}}, "additional properties 'timeout' not allowed"),
    ({"webhooks": {"url": "http://insecure.example.com"}}, "/webhooks/url"),
    ({"webhooks": {"url": "https://dev.example.com:8443"}}, "webhooks.caBundle is required with webhooks.url"),
    ({"metrics": {"service": False, "serviceMonitor": {"enabled": True}}}, "needs metrics.service: true"),
    # The chart renders RBAC, Secrets, Service ports and the proxies' xDS address from these values.
    ({"config": {"xds": {"enabled": False}}}, "config.xds.enabled is set by the chart from controlPlane.enabled"),
    ({"config": {"identity": {"ca_secret": "foo"}}}, "config.identity.ca_secret is set by the chart"),
    ({"replicaCount": 0}, "replicaCount 0 with webhooks.injection.failurePolicy Fail refuses every pod"),
    ({"podDisruptionBudget": {"minAvailable": 3}}, "podDisruptionBudget.minAvailable 3 of 3 replicas would block"),
])
def test_bad_values_fail_the_render_with_a_reason(render: Render, values: dict[str, Any], error: str) -> None:
    with pytest.raises(RenderError, match=re.escape(error)):
        render(values)


def test_every_value_is_documented() -> None:
    """Every value in values.yaml has a comment above it, or sits inside a block whose key has one. Section keys
    (a mapping of further keys) need none: their keys are checked one by one."""
    lines = [line for line in (CHART / "values.yaml").read_text().splitlines() if line.strip()]
    undocumented: list[str] = []
    documented: list[int] = []  # indents of enclosing keys that carry a comment
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z_][\w.]*):( *)(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        documented = [i for i in documented if i < indent]
        section = not match.group(4) and number + 1 < len(lines) and not lines[number + 1].lstrip().startswith("- ")
        if lines[number - 1].lstrip().startswith("#"):
            documented.append(indent)
        elif not documented and not section:
            undocumented.append(line.strip())
    assert not undocumented, f"values without a comment: {undocumented}"


# --- webhooks ----------------------------------------------------------------------------------------------------

def _calls(webhook_config: dict[str, Any], namespace: str, namespace_labels: dict[str, str],
           pod_labels: dict[str, str]) -> list[str]:
    """The webhooks of a configuration the API server calls for a pod, by label-selector semantics."""
    ns_labels = {"kubernetes.io/metadata.name": namespace, **namespace_labels}
    return [
        hook["name"] for hook in webhook_config["webhooks"]
        if parse_selector(hook.get("namespaceSelector", {})).matches(ns_labels)
        and parse_selector(hook.get("objectSelector", {})).matches(pod_labels)
    ]


ENABLED = {"meshguard.io/inject": "enabled"}
DISABLED = {"meshguard.io/inject": "disabled"}
POD_IN, POD_OUT = {"meshguard.io/inject": "true"}, {"meshguard.io/inject": "false"}


@pytest.mark.parametrize(("namespace", "ns_labels", "pod_labels", "expected"), [
    ("shop", ENABLED, {}, ["namespace.inject.meshguard.io"]),
    ("shop", ENABLED, {"app": "web"}, ["namespace.inject.meshguard.io"]),
    ("shop", ENABLED, POD_IN, ["namespace.inject.meshguard.io"]),
    ("shop", ENABLED, POD_OUT, []),
    ("shop", {}, POD_IN, ["object.inject.meshguard.io"]),
    ("shop", {}, {}, []),
    ("shop", {}, POD_OUT, []),
    ("shop", DISABLED, POD_IN, []),  # a namespace that opts out wins over the pod
    ("kube-system", ENABLED, POD_IN, []),
    ("kube-system", {}, POD_IN, []),
    ("kube-node-lease", ENABLED, {}, []),
    (NAMESPACE, ENABLED, POD_IN, []),  # meshguard never calls itself for its own pods
    ("monitoring", ENABLED, {}, []),  # excluded by values in this test
])
def test_which_pods_are_injected(render: Render, namespace: str, ns_labels: dict[str, str],
                                 pod_labels: dict[str, str], expected: list[str]) -> None:
    mutating, _ = _webhook_configs(render({"webhooks": {"excludeNamespaces": ["monitoring"]}}))
    assert _calls(mutating, namespace, ns_labels, pod_labels) == expected


@pytest.mark.parametrize(("namespace", "ns_labels", "called"), [
    ("shop", {}, True), ("shop", ENABLED, True), ("shop", DISABLED, True),
    ("kube-system", {}, False), ("kube-node-lease", {}, False), (NAMESPACE, {}, False), ("monitoring", {}, False),
])
def test_which_namespaces_are_validated(render: Render, namespace: str, ns_labels: dict[str, str],
                                        called: bool) -> None:
    _, validating = _webhook_configs(render({"webhooks": {"excludeNamespaces": ["monitoring"]}}))
    assert bool(_calls(validating, namespace, ns_labels, {"app": "web"})) is called


def test_no_webhook_is_called_for_the_system_namespaces_meshguard_never_touches(render: Render) -> None:
    for hook in [h for c in _webhook_configs(render()) for h in c["webhooks"]]:
        for namespace in SYSTEM_NAMESPACES:
            assert _calls({"webhooks": [hook]}, namespace, ENABLED, POD_IN) == [], (hook["name"], namespace)


def test_release_namespace_is_excluded_wherever_it_is_installed(render: Render) -> None:
    for hook in [h for c in _webhook_configs(render(namespace="platform")) for h in c["webhooks"]]:
        assert _calls({"webhooks": [hook]}, "platform", ENABLED, POD_IN) == []


def test_validating_webhook_rules_are_the_workload_kinds_meshguard_checks(render: Render) -> None:
    mutating, validating = _webhook_configs(render())
    (workloads,) = [w for w in validating["webhooks"] if w["name"] == "workloads.validate.meshguard.io"]
    called_for = {(group, version, resource) for rule in workloads["rules"] for group in rule["apiGroups"]
                  for version in rule["apiVersions"] for resource in rule["resources"]}
    # Every workload kind, and kubectl debug's subresource (its ephemeral containers reach no other webhook).
    assert called_for == {(k.group, k.version, k.resource) for k in WORKLOAD_KINDS.values()} | {
        ("", "v1", f"pods/{EPHEMERAL}")}
    assert {tuple(rule["resources"]) for w in mutating["webhooks"] for rule in w["rules"]} == {("pods",)}


def test_webhook_settings_every_good_practice(render: Render) -> None:
    mutating, validating = _webhook_configs(render())
    assert [h["name"] for h in mutating["webhooks"]] == ["namespace.inject.meshguard.io", "object.inject.meshguard.io"]
    assert [h["name"] for h in validating["webhooks"]] == ["workloads.validate.meshguard.io"]
    for hook in mutating["webhooks"] + validating["webhooks"]:
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["sideEffects"] == "NoneOnDryRun" and hook["matchPolicy"] == "Equivalent"
        assert hook["timeoutSeconds"] == 5
    for hook in mutating["webhooks"]:
        assert hook["reinvocationPolicy"] == "Never" and hook["failurePolicy"] == "Fail"
        assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                  "resources": ["pods"], "scope": "Namespaced"}]
        assert hook["clientConfig"]["service"] == {"name": FULLNAME, "namespace": NAMESPACE, "path": "/mutate",
                                                   "port": 443}
    hook = validating["webhooks"][0]
    assert hook["failurePolicy"] == "Ignore" and "reinvocationPolicy" not in hook
    assert hook["clientConfig"]["service"]["path"] == "/validate"
    covered = {(group, resource) for rule in hook["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"]}
    assert covered == {("", "pods"), ("", "replicationcontrollers"), ("apps", "deployments"),
                       ("apps", "statefulsets"), ("apps", "daemonsets"), ("apps", "replicasets"),
                       ("batch", "jobs"), ("batch", "cronjobs"), ("", "pods/ephemeralcontainers")}
    for rule in hook["rules"]:
        debug = rule["resources"] == ["pods/ephemeralcontainers"]
        assert rule["operations"] == (["UPDATE"] if debug else ["CREATE", "UPDATE"]) and rule["scope"] == "Namespaced"


def test_failure_and_reinvocation_policies_and_timeouts_come_from_values(render: Render, tmp_path: Path) -> None:
    objects = render(MATRIX["strict"])
    mutating, validating = _webhook_configs(objects)
    assert {(h["failurePolicy"], h["timeoutSeconds"], h["reinvocationPolicy"])
            for h in mutating["webhooks"]} == {("Ignore", 10, "IfNeeded")}
    assert {(h["failurePolicy"], h["timeoutSeconds"]) for h in validating["webhooks"]} == {("Fail", 30)}
    assert {"key": "team", "operator": "Exists"} in validating["webhooks"][0]["namespaceSelector"]["matchExpressions"]
    # What the server answers when it cannot evaluate a request follows the same choice.
    settings = _server_config(objects, tmp_path)
    assert (settings.failure.mutate, settings.failure.validate_) == ("allow", "deny")
    defaults = _server_config(render(), tmp_path)
    assert (defaults.failure.mutate, defaults.failure.validate_) == ("deny", "allow")


def test_url_override_runs_nothing_in_the_cluster(render: Render) -> None:
    objects = render(MATRIX["url"])
    mutating, validating = _webhook_configs(objects)
    for hook, path in [*((h, "/mutate") for h in mutating["webhooks"]), (validating["webhooks"][0], "/validate")]:
        assert hook["clientConfig"] == {"url": f"https://dev.example.com:8443{path}", "caBundle": CA_BUNDLE}
    assert not {"Deployment", "Service", "PodDisruptionBudget", "Certificate"} & set(kinds(objects))
    # The one Secret is where the server (wherever it runs) keeps the mesh CA of its workload signer.
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"] == [f"{FULLNAME}-mesh-ca"]
    assert "annotations" not in mutating["metadata"]


# --- certificates ------------------------------------------------------------------------------------------------

def test_helm_mode_serves_a_certificate_the_webhooks_trust(render: Render, tmp_path: Path) -> None:
    objects = render(MATRIX["helm"])
    secret = find(objects, "Secret", f"{FULLNAME}-tls")
    assert secret["type"] == "kubernetes.io/tls" and int(secret["metadata"]["annotations"]["meshguard.io/not-after"])
    bundles = {h["clientConfig"]["caBundle"] for c in _webhook_configs(objects) for h in c["webhooks"]}
    assert bundles == {secret["data"]["ca.crt"]}
    # The Deployment mounts exactly this Secret where the server reads its certificate.
    volume = next(v for v in find(objects, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "certs")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    for name in ("tls.crt", "tls.key"):
        (tmp_path / name).write_bytes(base64.b64decode(secret["data"][name]))
    served = handshake(tmp_path, secret["data"]["ca.crt"], f"{FULLNAME}.{NAMESPACE}.svc")
    san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == set(certs.service_dns_names(FULLNAME, NAMESPACE))


def test_cert_manager_mode(render: Render) -> None:
    objects = render(MATRIX["cert-manager"])
    serving = find(objects, "Certificate", f"{FULLNAME}-serving")["spec"]
    assert serving["dnsNames"] == list(certs.service_dns_names(FULLNAME, NAMESPACE))
    assert serving["secretName"] == f"{FULLNAME}-tls" and serving["privateKey"]["rotationPolicy"] == "Always"
    # Its own CA, so a renewal of the serving certificate does not change what the API server trusts.
    ca = find(objects, "Certificate", f"{FULLNAME}-ca")["spec"]
    assert ca["isCA"] is True and ca["issuerRef"]["name"] == f"{FULLNAME}-selfsigned"
    assert find(objects, "Issuer", f"{FULLNAME}-ca")["spec"] == {"ca": {"secretName": ca["secretName"]}}
    assert serving["issuerRef"]["name"] == f"{FULLNAME}-ca"
    for webhook_config in _webhook_configs(objects):
        assert webhook_config["metadata"]["annotations"] == {
            "cert-manager.io/inject-ca-from": f"{NAMESPACE}/{FULLNAME}-serving"}
        assert all("caBundle" not in h["clientConfig"] for h in webhook_config["webhooks"])
    volume = next(v for v in find(objects, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "certs")
    assert volume["secret"]["secretName"] == serving["secretName"]
    # cert-manager makes the serving certificate's Secret; the chart's only Secret is the mesh CA's.
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"] == [f"{FULLNAME}-mesh-ca"]

    with_issuer = render(MATRIX["cert-manager-issuer"])
    assert "Issuer" not in kinds(with_issuer)
    assert find(with_issuer, "Certificate")["spec"]["issuerRef"] == ISSUER


def test_client_ca_configmap_is_mounted_where_the_server_reads_it(render: Render, tmp_path: Path) -> None:
    assert _server_config(render(), tmp_path).tls.client_ca_file is None  # no client certificate asked by default
    objects = render({"clientCA": {"configMap": "apiserver-client-ca", "key": "bundle.pem"}})
    client_ca_file = _server_config(objects, tmp_path).tls.client_ca_file
    (mount,) = [m for m in _container(objects)["volumeMounts"] if m["name"] == "client-ca"]
    assert client_ca_file == Path(mount["mountPath"]) / "bundle.pem" and mount["readOnly"] is True
    (volume,) = [v for v in find(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == "client-ca"]
    assert volume == {"name": "client-ca", "configMap": {"name": "apiserver-client-ca"}}


def test_self_managed_mode_wiring(render: Render, tmp_path: Path) -> None:
    objects = render()
    settings = _server_config(objects, tmp_path).certificates
    secret = find(objects, "Secret", settings.secret_name)
    assert "data" not in secret and secret["type"] == "Opaque"
    assert settings.self_managed is True and settings.service == find(objects, "Service", FULLNAME)["metadata"]["name"]
    mutating, validating = _webhook_configs(objects)
    assert (settings.mutating_webhook, settings.validating_webhook) == (mutating["metadata"]["name"],
                                                                        validating["metadata"]["name"])
    assert all("caBundle" not in h["clientConfig"] for c in (mutating, validating) for h in c["webhooks"])
    (settings_dir,) = [m["mountPath"] for m in _container(objects)["volumeMounts"] if m["name"] == "certs"]
    assert Path(settings_dir) == _server_config(objects, tmp_path).tls.cert_dir
    volume = next(v for v in find(objects, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "certs")
    assert volume["emptyDir"]["medium"] == "Memory"
    for mode in ("helm", "certManager"):
        assert _server_config(render({"certificates": {"mode": mode}}), tmp_path).certificates.self_managed is False


# --- RBAC --------------------------------------------------------------------------------------------------------

READS = [
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["list", "watch"]},
    {"apiGroups": ["security.istio.io"], "resources": ["peerauthentications"], "verbs": ["list", "watch"]},
]
# Events on the objects it denies or warns about.
EVENTS = [{"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]}]
# The control plane's (controlPlane.enabled, the default): endpoints and which pods carry the proxy.
CONTROL_PLANE = [
    {"apiGroups": [""], "resources": ["pods", "services"], "verbs": ["list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["servicecidrs"], "verbs": ["list", "watch"]},
]


def _server_rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rules bound to the server's ServiceAccount (the helm test's own Role is a hook, checked separately)."""
    return [rule for o in objects if o["kind"] in ("ClusterRole", "Role")
            and "helm.sh/hook" not in o["metadata"].get("annotations", {}) for rule in o["rules"]]


CERTS = "certificates.k8s.io"
# The workload signer's: its requests, their status, its own signer name, its own trust bundle (created once).
SIGNER = [
    {"apiGroups": [CERTS], "resources": ["podcertificaterequests"], "verbs": ["list", "watch"]},
    {"apiGroups": [CERTS], "resources": ["podcertificaterequests/status"], "verbs": ["update"]},
    {"apiGroups": [CERTS], "resources": ["signers"], "resourceNames": ["meshguard.io/workload"],
     "verbs": ["sign", "attest"]},
    {"apiGroups": [CERTS], "resources": ["clustertrustbundles"], "verbs": ["create"]},
    {"apiGroups": [CERTS], "resources": ["clustertrustbundles"], "resourceNames": ["meshguard.io:workload:mesh-ca"],
     "verbs": ["get", "update"]},
]


def _secrets(*names: str) -> dict[str, Any]:
    return {"apiGroups": [""], "resources": ["secrets"], "resourceNames": list(names), "verbs": ["get", "update"]}


# A certificate Secret per ServiceAccount (identity.mode secret, or auto without Pod Certificates).
ACCOUNT_SECRETS = [
    {"apiGroups": [""], "resources": ["serviceaccounts", "pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "create", "update"]},
]
POD_CERTIFICATES = ("certificates.k8s.io/v1/PodCertificateRequest", "certificates.k8s.io/v1/ClusterTrustBundle")


def test_rbac_least_privilege(render: Render) -> None:
    for case in ("helm", "cert-manager"):
        assert _server_rules(render(MATRIX[case], api_versions=POD_CERTIFICATES)) == [
            *READS, *EVENTS, *CONTROL_PLANE, *SIGNER, _secrets(f"{FULLNAME}-mesh-ca")]
        without = {**MATRIX[case], "identity": {"mode": "static"}, "controlPlane": {"enabled": False}}
        assert _server_rules(render(without)) == [*READS, *EVENTS]
        secrets = {**MATRIX[case], "identity": {"mode": "secret"}}
        assert _server_rules(render(secrets, api_versions=POD_CERTIFICATES)) == [
            *READS, *EVENTS, *CONTROL_PLANE, *ACCOUNT_SECRETS, _secrets(f"{FULLNAME}-mesh-ca")]
        # auto on a cluster without Pod Certificates may do either (the cluster may be upgraded under it).
        assert _server_rules(render(MATRIX[case])) == [
            *READS, *EVENTS, *CONTROL_PLANE, *ACCOUNT_SECRETS, *SIGNER, _secrets(f"{FULLNAME}-mesh-ca")]
    objects = render(api_versions=POD_CERTIFICATES)
    assert _server_rules(objects) == [*READS, *EVENTS, *CONTROL_PLANE, {
        "apiGroups": ["admissionregistration.k8s.io"],
        "resources": ["mutatingwebhookconfigurations", "validatingwebhookconfigurations"],
        "resourceNames": [FULLNAME], "verbs": ["get", "update"],
    }, *SIGNER, _secrets(f"{FULLNAME}-tls", f"{FULLNAME}-mesh-ca")]
    role = find(objects, "Role", FULLNAME)
    assert role["metadata"]["namespace"] == NAMESPACE
    for binding in (find(objects, "RoleBinding", FULLNAME), find(objects, "ClusterRoleBinding")):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert find(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == FULLNAME
    assert not {"ClusterRole", "Role", "ServiceAccount"} & set(kinds(
        [o for o in render(MATRIX["single"]) if "helm.sh/hook" not in o["metadata"].get("annotations", {})]))


# --- the server's pods -------------------------------------------------------------------------------------------

def test_deployment_availability(render: Render) -> None:
    objects = render()
    deployment = find(objects, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["priorityClassName"] == "system-cluster-critical"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (preferred,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert parse_selector(preferred["podAffinityTerm"]["labelSelector"]).matches(pod_labels)
    (spread,) = spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert parse_selector(spread["labelSelector"]).matches(pod_labels)
    pdb = find(objects, "PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1 and parse_selector(pdb["selector"]).matches(pod_labels)
    assert parse_selector({"matchLabels": deployment["spec"]["selector"]["matchLabels"]}).matches(pod_labels)
    assert pod_labels["meshguard.io/inject"] == "false"

    hard = find(render(MATRIX["strict"]), "Deployment")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert list(hard) == ["requiredDuringSchedulingIgnoredDuringExecution"]
    single = render(MATRIX["single"])
    assert "PodDisruptionBudget" not in kinds(single)  # minAvailable 1 of 1 would block every node drain
    single_spec = find(single, "Deployment")["spec"]["template"]["spec"]
    assert "affinity" not in single_spec and "priorityClassName" not in single_spec
    assert single_spec["serviceAccountName"] == "existing"
    overrides = find(render(MATRIX["overrides"]), "Deployment")["spec"]["template"]["spec"]["affinity"]
    assert set(overrides) == {"nodeAffinity", "podAntiAffinity"}


def test_container_security_and_resources(render: Render) -> None:
    objects = render()
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = _container(objects)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]} and security["runAsNonRoot"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"} and security["privileged"] is False
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"},
                                      "limits": {"cpu": "1", "memory": "1Gi"}}
    assert container["image"] == "meshguard:0.1.0"
    assert container["args"] == ["serve", "--config", "/etc/meshguard/config.yaml"]
    assert {"name": "MESHGUARD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} \
        in container["env"]
    digest = "sha256:" + "a" * 64
    assert _container(render(MATRIX["single"]))["image"] == f"meshguard@{digest}"


@pytest.mark.parametrize("case", ["defaults", "overrides"])
def test_probes_and_services_reach_the_configured_ports(render: Render, case: str, tmp_path: Path) -> None:
    objects = render(MATRIX[case])
    settings = _server_config(objects, tmp_path)
    container = _container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"https": settings.server.port, "http-metrics": settings.server.health_port,
                     "grpc-xds": settings.xds.port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    fullname = "guard" if case == "overrides" else FULLNAME
    webhook_service = find(objects, "Service", fullname)["spec"]
    assert webhook_service["ports"] == [
        {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"},
        {"name": "grpc-xds", "port": settings.xds.port, "targetPort": "grpc-xds", "protocol": "TCP"}]
    # The proxies dial the Service, at the port it serves xDS on.
    assert settings.xds.enabled
    assert settings.injection.xds_address == f"{fullname}.{NAMESPACE}.svc:{settings.xds.port}"
    metrics_service = find(objects, "Service", f"{fullname}-metrics")["spec"]
    assert metrics_service["ports"][0]["targetPort"] == "http-metrics"
    pod_labels = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for service in (webhook_service, metrics_service):
        assert parse_selector({"matchLabels": service["selector"]}).matches(pod_labels)


def test_config_merges_values_over_chart_defaults(render: Render, tmp_path: Path) -> None:
    objects = render(MATRIX["overrides"])
    settings = _server_config(objects, tmp_path)
    assert settings.log_level == "debug" and settings.server.port == 9443
    assert settings.injection.proxy_image == "envoyproxy/envoy:v1.32.0"
    assert settings.injection.init_image == _container(objects)["image"]  # the init container runs this image
    assert settings.server.shutdown_delay_seconds > 0  # endpoints drop a stopping pod before it closes
    grace = find(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.server.shutdown_delay_seconds + settings.server.graceful_timeout_seconds


def test_config_checksum_rolls_the_pods_only_when_the_config_changes(render: Render) -> None:
    def checksum(values: dict[str, Any]) -> str:
        return find(render(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = checksum({})
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum({"replicaCount": 4}) == base
    assert checksum({"config": {"log_level": "debug"}}) != base
    assert checksum({"webhooks": {"validation": {"failurePolicy": "Fail"}}}) != base  # failure.validate follows


# --- observability and helm test ---------------------------------------------------------------------------------

def test_service_monitor_and_dashboard(render: Render) -> None:
    objects = render(MATRIX["cert-manager"])
    monitor = find(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http-metrics" and endpoint["path"] == "/metrics"
    metrics_service = find(objects, "Service", f"{FULLNAME}-metrics")
    assert parse_selector(monitor["spec"]["selector"]).matches(metrics_service["metadata"]["labels"])
    webhook_service = find(objects, "Service", FULLNAME)
    assert not parse_selector(monitor["spec"]["selector"]).matches(webhook_service["metadata"]["labels"])
    assert [p["name"] for p in metrics_service["spec"]["ports"]] == [endpoint["port"]]

    dashboard_map = find(objects, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard_map["metadata"]["namespace"] == "monitoring"
    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboard_map["data"]["meshguard.json"])
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"meshguard_\w+", target["expr"])}
    assert {"meshguard_admission_requests_total", "meshguard_admission_duration_seconds_bucket",
            "meshguard_injections_total", "meshguard_policy_results_total",
            "meshguard_serving_certificate_expiry_timestamp_seconds"} <= queried
    exposed = {sample.name for family in Metrics().registry.collect() for sample in family.samples}
    exposed |= {f"{family.name}_bucket" for family in Metrics().registry.collect() if family.type == "histogram"}
    exposed |= {f"{family.name}_total" for family in Metrics().registry.collect() if family.type == "counter"}
    exposed |= {family.name for family in Metrics().registry.collect()}
    assert queried <= exposed, f"the dashboard queries metrics the server does not expose: {queried - exposed}"
    assert "ServiceMonitor" not in kinds(render()) and not [
        o for o in render() if o["metadata"]["name"].endswith("-dashboard")]


def test_helm_test_hook(render: Render) -> None:
    objects = render({"tests": {"namespace": "shop"}})
    hooks = [o for o in objects if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    assert kinds(hooks) == ["ConfigMap", "Pod", "Role", "RoleBinding", "ServiceAccount"]
    pod = find(hooks, "Pod")
    assert pod["metadata"]["namespace"] == NAMESPACE  # excluded from the webhooks: never injected itself
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python", "/test/helm-test.py", "shop", PROXY_NAME]
    assert container["image"] == _container(objects)["image"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert find(hooks, "ConfigMap")["data"]["helm-test.py"] == (CHART / "files" / "helm-test.py").read_text()
    role = find(hooks, "Role")
    assert role["metadata"]["namespace"] == "shop"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}]
    assert find(hooks, "RoleBinding")["subjects"][0]["name"] == pod["spec"]["serviceAccountName"]
    for hook in hooks:
        assert "hook-succeeded" in hook["metadata"]["annotations"]["helm.sh/hook-delete-policy"]


@pytest.mark.parametrize(("values", "served", "source"), [
    ({}, POD_CERTIFICATES, "projected"),
    ({}, ("certificates.k8s.io/v1beta1/PodCertificateRequest", "certificates.k8s.io/v1beta1/ClusterTrustBundle"),
     "projected"),
    ({}, (), "secret"),
    # The server signs only where both are served (it publishes the mesh CA as a ClusterTrustBundle).
    ({}, ("certificates.k8s.io/v1/PodCertificateRequest",), "secret"),
    ({"identity": {"mode": "secret"}}, POD_CERTIFICATES, "secret"),
    ({"identity": {"mode": "static"}}, POD_CERTIFICATES, None),
], ids=["auto-v1", "auto-v1beta1", "auto-without", "auto-requests-only", "secret", "static"])
def test_the_helm_test_pod_mounts_a_workload_certificate_as_a_proxy_would(
        render: Render, values: dict[str, Any], served: tuple[str, ...], source: str | None) -> None:
    pod = find([o for o in render({**values, "config": {"injection": {"trust_domain": "corp.example"}}},
                                  api_versions=served)
                if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"], "Pod")
    (container,) = pod["spec"]["containers"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    account = pod["spec"]["serviceAccountName"]
    if source is None:  # the platform's own Secret per namespace: nothing of meshguard's to check
        assert "identity" not in volumes and not env
        return
    assert env == {"IDENTITY_DIR": "/identity",
                   "IDENTITY_SPIFFE_ID": f"spiffe://corp.example/ns/{NAMESPACE}/sa/{account}"}
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["identity"] == "/identity"
    if source == "projected":
        sources = volumes["identity"]["projected"]["sources"]
        assert sources[0]["podCertificate"]["signerName"] == "meshguard.io/workload"
        assert sources[1]["clusterTrustBundle"] == {"name": "meshguard.io:workload:mesh-ca", "path": "ca.crt"}
    else:  # the Secret meshguard keeps for the pod's account, which it finds by the pod's opt-in label
        assert volumes["identity"]["secret"]["secretName"] == f"meshguard-identity-{account}"
        assert pod["metadata"]["labels"]["meshguard.io/inject"] == "true"


def test_values_yaml_matches_the_schema_defaults() -> None:
    """values.yaml is the documented source of the defaults; the schema constrains but never hides one."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def keys(node: dict[str, Any], prefix: str = "") -> set[str]:
        out = set()
        for key, value in node.get("properties", {}).items():
            out.add(prefix + key)
            if value.get("additionalProperties") is False:
                out |= keys(value, f"{prefix}{key}.")
        return out

    def value_keys(node: dict[str, Any], prefix: str = "") -> set[str]:
        out = set()
        for key, value in node.items():
            out.add(prefix + key)
            if isinstance(value, dict) and value and key not in ("config", "resources", "affinity", "labels"):
                out |= value_keys(value, f"{prefix}{key}.")
        return out

    assert value_keys(values) - keys(schema) == set()
    assert keys(schema) - value_keys(values) <= {"global", "certificates.certManager.issuerRef.name",
                                                 "certificates.certManager.issuerRef.kind",
                                                 "certificates.certManager.issuerRef.group"}


def test_the_control_plane_address_can_be_pinned_or_turned_off(render: Render, tmp_path: Path) -> None:
    pinned = render({"service": {"clusterIP": "10.96.0.50"}, "controlPlane": {"address": "10.96.0.50:15012"}})
    assert find(pinned, "Service", FULLNAME)["spec"]["clusterIP"] == "10.96.0.50"
    assert _server_config(pinned, tmp_path).injection.xds_address == "10.96.0.50:15012"
    off = render({"controlPlane": {"enabled": False}})
    settings = _server_config(off, tmp_path)
    assert not settings.xds.enabled and settings.injection.xds_address is None  # static bootstraps
    assert [p["name"] for p in find(off, "Service", FULLNAME)["spec"]["ports"]] == ["https"]
    assert "grpc-xds" not in {p["name"] for p in _container(off)["ports"]}
    # Out of the cluster (webhooks.url) there is no Service to dial: proxies need an address, else stay static.
    outside = render({"webhooks": {"url": "https://dev.example.com:8443", "caBundle": "eA=="}})
    assert not any("xds_address" in json.dumps(o) for o in outside)


def test_the_audit_cronjob_reads_every_workload_kind_and_runs_locked_down(render: Render) -> None:
    assert not [o for o in render() if o["kind"] == "CronJob"]  # off by default
    objects = render({"audit": {"enabled": True, "schedule": "*/30 * * * *"}})
    cron = find(objects, "CronJob", f"{FULLNAME}-audit")
    assert cron["spec"]["schedule"] == "*/30 * * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["audit", "--config", "/etc/meshguard/config.yaml", "-o", "json"]
    assert container["image"] == f"meshguard:{__version__}" and pod["restartPolicy"] == "Never"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"]
    assert pod["serviceAccountName"] == f"{FULLNAME}-audit"
    # Exactly list on the policy state and on every workload kind meshguard handles: nothing to write.
    role = find(objects, "ClusterRole", f"{FULLNAME}-audit")
    listed = {(group, resource) for rule in role["rules"] for group in rule["apiGroups"]
              for resource in rule["resources"]}
    assert listed == {(k.group, k.resource) for k in WORKLOAD_KINDS.values()} | {
        ("", "namespaces"), ("networking.k8s.io", "networkpolicies"), ("security.istio.io", "peerauthentications")}
    assert all(rule["verbs"] == ["list"] for rule in role["rules"])
    # rbac.create false: the platform grants it, as it does the server's.
    unmanaged = render({"audit": {"enabled": True}, "rbac": {"create": False}})
    assert find(unmanaged, "CronJob", f"{FULLNAME}-audit")
    assert not [o for o in unmanaged if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
                and "helm.sh/hook" not in o["metadata"].get("annotations", {})]  # helm test's own: a hook


def test_only_the_servers_pods_are_its_services_endpoints_and_count_for_its_disruption_budget(
        render: Render) -> None:
    """The audit Job's and the test's pods carry the chart's name too: a webhook call routed to one fails, and a
    running one counted as an available replica would let a drain evict every server."""
    objects = render({"audit": {"enabled": True}, "tests": {"namespace": "shop"}})
    server = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    audit = find(objects, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    test = find(objects, "Pod")["metadata"]["labels"]
    selectors = [{"matchLabels": s["spec"]["selector"]} for s in objects if s["kind"] == "Service"]
    selectors.append(find(objects, "PodDisruptionBudget")["spec"]["selector"])
    affinity = find(objects, "Deployment")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    selectors += [t["podAffinityTerm"]["labelSelector"] for t in affinity[
        "preferredDuringSchedulingIgnoredDuringExecution"]]
    assert len(selectors) == 4
    for selector in map(parse_selector, selectors):
        assert selector.matches(server) and not selector.matches(audit) and not selector.matches(test)


def test_excluded_namespaces_are_neither_judged_by_the_audit_nor_injected(render: Render, tmp_path: Path) -> None:
    settings = _server_config(render({"webhooks": {"excludeNamespaces": ["cert-manager"]}}), tmp_path)
    assert list(settings.policy.exempt.namespaces) == ["cert-manager"]
    assert list(settings.injection.exclude_namespaces) == ["cert-manager"]
    assert not list(_server_config(render(), tmp_path).policy.exempt.namespaces)

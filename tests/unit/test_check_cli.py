"""``meshguard check``: the offline policy check a CI pipeline runs, end to end through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import CORPUS
from webhook.cli import main

BOUTIQUE = str(CORPUS / "online-boutique" / "kubernetes-manifests.yaml")
BOUTIQUE_POLICIES = str(CORPUS / "online-boutique" / "network-policies")
BOOKINFO = str(CORPUS / "bookinfo" / "bookinfo.yaml")
IN_MESH = ("--namespace-labels", "meshguard.io/inject=enabled")


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_boutique_alone_fails_every_deployment_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = check(capsys, "-f", BOUTIQUE, "-n", "shop", *IN_MESH, "-o", "json")
    assert code == 1
    report = json.loads(out)
    assert len(report["workloads"]) == 12
    for entry in report["workloads"]:
        assert entry["kind"] == "Deployment" and entry["namespace"] == "shop" and entry["passed"] is False
        rules = {r["rule"]: r for r in entry["rules"]}
        assert set(rules) == {"network-policy", "mtls"}
        assert rules["network-policy"]["passed"] is False and rules["network-policy"]["action"] == "enforce"
        assert rules["network-policy"]["message"].startswith(f"Deployment shop/{entry['name']}: no NetworkPolicy")
        assert rules["mtls"]["passed"] is True
    assert report["summary"] == {"workloads": 12, "failed": 12, "exempt": 0, "podsWithoutSidecar": 0}


def test_boutique_with_its_policies_passes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = check(capsys, "-f", BOUTIQUE, "-f", BOUTIQUE_POLICIES, "-n", "shop", *IN_MESH)
    assert code == 0
    assert out.count("PASS   Deployment shop/") == 12
    assert out.endswith("12 workloads: 0 failed, 12 passed, 0 exempt\n")


def test_bookinfo_with_written_policies_and_namespace_object(capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "books", "labels": {
            "meshguard.io/inject": "enabled"}}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "default-deny"},
         "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}},
    ]))
    code, out, _ = check(capsys, "-f", BOOKINFO, "-f", str(policies), "--namespace", "books")
    assert code == 0, out
    assert "6 workloads: 0 failed, 6 passed, 0 exempt" in out
    # Without the namespace labeled, every Deployment fails mTLS, and the text says how to fix it.
    code, out, _ = check(capsys, "-f", BOOKINFO, "-f", str(policies), "--namespace", "other")
    assert code == 1
    assert ("FAIL   Deployment other/ratings-v1\n       mtls [enforce]: its pods will run without the meshguard "
            "sidecar (namespace other is not labeled meshguard.io/inject=enabled)") in out


def test_objects_keep_their_own_namespace(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    objects: list[dict[str, Any]] = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "kube-system"},
         "spec": {"template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}}}},
    ]
    path = tmp_path / "in.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    code, out, _ = check(capsys, "-f", str(path), "-n", "shop")
    assert code == 0
    assert out.startswith("EXEMPT Deployment kube-system/web: namespace kube-system is always exempt\n")


@pytest.mark.parametrize(
    ("content", "args", "fragment"),
    [
        (None, (), "no such file or directory"),
        ("kind: [unclosed", (), "not valid YAML or JSON"),
        (yaml.safe_dump({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p"},
                         "spec": {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals"}]}}}),
         (), "NetworkPolicy default/p was ignored"),
        ("", ("--namespace-labels", "novalue"), "--namespace-labels: expected key=value"),
    ],
    ids=["missing", "bad-yaml", "invalid-policy", "bad-labels"],
)
def test_unreadable_input_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str | None,
                                  args: tuple[str, ...], fragment: str) -> None:
    path = tmp_path / "in.yaml"
    if content is not None:
        path.write_text(content)
    code, out, err = check(capsys, "-f", str(path), *args)
    assert code == 2 and out == ""
    assert fragment in err


def test_configuration_file_applies(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"policy": {"exempt": {"namespaces": ["shop"]}}}))
    code, out, _ = check(capsys, "-f", BOUTIQUE, "-n", "shop", "--config", str(config))
    assert code == 0
    assert out.count("EXEMPT Deployment shop/") == 12


def test_a_bare_pod_is_judged_as_the_injector_would_make_it(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    """Offline there is no injector: a Pod manifest in a mesh namespace is judged with the sidecar it will get,
    not told to go and recreate itself in a live cluster."""
    pod: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}},
                           "spec": {"containers": [{"name": "app", "image": "shop/web:1"}]}}
    deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "deny"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump_all([pod, deny]))
    code, out, _ = check(capsys, "-f", str(manifest), "-n", "shop", *IN_MESH)
    assert code == 0 and "PASS   Pod shop/web" in out, out
    # What the injector cannot fix still fails: a container that could undo the redirect.
    pod["spec"]["containers"][0]["securityContext"] = {"capabilities": {"add": ["NET_ADMIN"]}}
    manifest.write_text(yaml.safe_dump_all([pod, deny]))
    code, out, _ = check(capsys, "-f", str(manifest), "-n", "shop", *IN_MESH)
    assert code == 1 and "container app has NET_ADMIN, with which it could undo the traffic redirect" in out, out

"""The injected proxy container's command line, as the kubelet would run it, is accepted by the real Envoy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import jsonpatch
import pytest

from tests.dataplane.tools import POD_VALUES, envoy_binary, write_workload_certs
from webhook import envoy
from webhook.injection.decision import PROXY_NAME
from webhook.injection.patch import plan
from webhook.injection.settings import CERT_DIR, InjectionSettings
from webhook.workloads import as_workload


@pytest.mark.parametrize("annotations", [{}, {"meshguard.io/log-level": "debug"},
                                         {"meshguard.io/native-sidecar": "false"}])
def test_real_envoy_accepts_the_injected_arguments(tmp_path: Path, annotations: dict[str, str]) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-7d4b9", "annotations": annotations},
           "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "shop/web:1"}]}}
    workload = as_workload(pod, "shop")
    assert workload is not None
    injected = jsonpatch.apply_patch(pod, plan(workload, InjectionSettings(), "meshguard").ops)
    (proxy,) = [c for c in injected["spec"].get("initContainers", []) + injected["spec"]["containers"]
                if c["name"] == PROXY_NAME]
    # The kubelet expands $(VAR) from the container's env (all Downward API values here) ...
    assert {e["name"] for e in proxy["env"]} == set(POD_VALUES)
    args = [envoy.expand_pod_variables(arg, POD_VALUES) for arg in proxy["args"]]
    assert not any("$(" in arg for arg in args)
    # ... and the certificate Secret is mounted at CERT_DIR; here it lives in a temporary directory.
    certs = write_workload_certs(tmp_path / "ca", tmp_path / "web", "shop", "web")
    args = [arg.replace(CERT_DIR, str(certs)) for arg in args]
    assert proxy["command"] == ["envoy"]
    done = subprocess.run([envoy_binary(), "--mode", "validate", *args], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr

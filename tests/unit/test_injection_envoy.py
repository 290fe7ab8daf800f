"""The injected proxy's command line, as the kubelet would run it, is accepted by the real Envoy: with the
bootstrap written by the injected ``meshguard-init`` container (as root, in a network namespace of its own), or
inline in its arguments."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from tests.dataplane.tools import (
    POD_VALUES,
    container_env,
    envoy_binary,
    localize,
    run_init_container,
    write_workload_certs,
)
from webhook import envoy
from webhook.injection.decision import INIT_NAME, PROXY_NAME
from webhook.injection.patch import plan
from webhook.injection.settings import CERT_DIR, InjectionSettings
from webhook.injection.spec import INBOUND_MTLS_ENV, STATE_DIR
from webhook.workloads import as_workload

# An app container whose probes the injector rewrites: httpGet by port name with a query and headers, tcpSocket,
# httpGet over HTTPS.
PROBED = {"name": "web", "image": "shop/web:1", "ports": [{"name": "http", "containerPort": 8080}],
          "readinessProbe": {"httpGet": {"path": "/healthz?full=1", "port": "http",
                                          "httpHeaders": [{"name": "X-Probe", "value": "1"}]}},
          "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 5, "timeoutSeconds": 2},
          "startupProbe": {"httpGet": {"path": "/started", "port": 8443, "scheme": "HTTPS"}}}


@pytest.mark.parametrize("bootstrap", ["inline", "init-container"])
@pytest.mark.parametrize(("annotations", "app"), [
    ({}, {"name": "web", "image": "shop/web:1"}),
    ({"meshguard.io/log-level": "debug"}, {"name": "web", "image": "shop/web:1"}),
    ({"meshguard.io/native-sidecar": "false"}, {"name": "web", "image": "shop/web:1"}),
    ({}, PROBED),
    ({"meshguard.io/native-sidecar": "false", "meshguard.io/hold-application-until-proxy-starts": "true"}, PROBED),
], ids=["plain", "log-level", "classic", "probes", "probes-hold"])
def test_real_envoy_accepts_the_injected_arguments(tmp_path: Path, annotations: dict[str, str],
                                                   app: dict[str, Any], bootstrap: str) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-7d4b9", "annotations": annotations},
           "spec": {"serviceAccountName": "web", "containers": [copy.deepcopy(app)]}}
    workload = as_workload(pod, "shop")
    assert workload is not None
    settings = InjectionSettings(bootstrap=bootstrap)  # type: ignore[arg-type]
    injected = jsonpatch.apply_patch(pod, plan(workload, settings, "meshguard").ops)
    containers = {c["name"]: c for c in injected["spec"].get("initContainers", []) + injected["spec"]["containers"]}
    proxy = containers[PROXY_NAME]
    assert proxy["command"] == ["envoy"]
    # The certificate Secret is mounted at CERT_DIR and the shared volume at STATE_DIR; here both are directories.
    certs = write_workload_certs(tmp_path / "ca", tmp_path / "web", "shop", "web")
    paths = {CERT_DIR: str(certs), STATE_DIR: str(tmp_path / "state")}
    (tmp_path / "state").mkdir()
    # meshguard-init writes the SDS files (and, unless inline, the bootstrap) into the shared volume.
    init = containers[INIT_NAME]
    run_init_container(localize(init["args"], paths), container_env(init))
    if bootstrap == "inline":
        # The kubelet expands $(VAR) from the container's env: Downward API values and the probe splices (and, with
        # a static bootstrap, the inbound modes it enforces, for the policy to read).
        env = container_env(proxy)
        assert set(POD_VALUES) | set(envoy.SPLICES.values()) | {INBOUND_MTLS_ENV} == set(env)
        args = [envoy.expand_pod_variables(arg, env) for arg in proxy["args"]]
        assert not any("$(" in arg for arg in args) and "env" not in init
    else:
        args = proxy["args"]
        assert "--config-path" in args and not (tmp_path / "state").joinpath(".envoy.json.partial").exists()
    done = subprocess.run([envoy_binary(), "--mode", "validate", *localize(args, paths)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

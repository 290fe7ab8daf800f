"""The configuration reference of docs/configuration.md, generated from the settings models.

Every key of :class:`webhook.config.Settings`, dotted as in the YAML file, with its type, default and description.
A key's description is its ``Field(description=...)`` when it has one, else the comment lines directly above the
field in its class's source, else a note from ``_NOTES`` below (for the few fields the source leaves undescribed).
A section's text is its class docstring. tests/unit/test_docs.py fails when the file and the models disagree.

    python -m webhook.reference     # rewrite the generated section of docs/configuration.md
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .config import Settings

BEGIN = "<!-- BEGIN GENERATED: configuration -->"
END = "<!-- END GENERATED: configuration -->"
DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

# Descriptions of the fields whose source has neither a description nor a comment. The source wins: a note for a
# field that gains a comment is dead, and tests/unit/test_docs.py says so.
_NOTES: dict[str, str] = {
    "log_level": "The server's log level.",
    "server.host": "Address of the HTTPS admission listener (`server.port`).",
    "server.health_host": "Address of the plain HTTP health and metrics listener (`server.health_port`).",
    "tls.cert_dir": "Holds `tls.crt` and `tls.key`, reloaded when they change.",
    "tls.min_version": "The lowest TLS version the admission port accepts.",
    "limits.max_labels": "Labels of one pod template.",
    "limits.max_annotations": "Annotations of one pod template.",
    "failure.mutate": "The answer to a request `/mutate` cannot evaluate.",
    "failure.validate": "The answer to a request `/validate` cannot evaluate.",
    "injection.proxy_image": "The Envoy image of the `meshguard-proxy` sidecar (`meshguard.io/proxy-image`).",
    "injection.image_pull_policy": "Of every injected container.",
    "injection.proxy_uid": "uid and gid of the proxy; traffic from this uid is never captured.",
    "injection.log_level": "Envoy's log level (annotation `meshguard.io/log-level`).",
    "injection.proxy_cpu": "CPU request of the proxy and the injected init containers (`meshguard.io/proxy-cpu`).",
    "injection.proxy_memory": "Memory request of the same (`meshguard.io/proxy-memory`).",
    "injection.proxy_cpu_limit": "CPU limit of the same (`meshguard.io/proxy-cpu-limit`).",
    "injection.proxy_memory_limit": "Memory limit of the same (`meshguard.io/proxy-memory-limit`).",
    "injection.exclude_outbound_ports": "Outbound ports never captured (`meshguard.io/exclude-outbound-ports`).",
    "injection.include_outbound_ip_ranges": "Outbound destinations captured, `*` for all "
    "(`meshguard.io/include-outbound-ip-ranges`).",
    "injection.exclude_outbound_ip_ranges": "Outbound destinations never captured "
    "(`meshguard.io/exclude-outbound-ip-ranges`).",
    "injection.trust_domain": "SPIFFE trust domain: peers must present a `spiffe://<trust_domain>/` URI.",
    "certificates.self_managed": "Keep the serving certificate in a Secret and the webhooks' caBundle current.",
    "certificates.mutating_webhook": "The MutatingWebhookConfiguration whose caBundle is kept current.",
    "certificates.validating_webhook": "The ValidatingWebhookConfiguration whose caBundle is kept current.",
    "certificates.validity_days": "Serving certificate lifetime; the CA (10 years) is replaced while it can still "
    "outlive a new certificate.",
    "certificates.renew_before_days": "Renew the serving certificate this many days before it expires.",
    "policy.network_policy.action": "`enforce` (deny), `warn` (allow with a warning) or `audit` (allow, log, count).",
    "policy.mtls.action": "`enforce` (deny), `warn` (allow with a warning) or `audit` (allow, log, count).",
    "policy.exempt.namespaces": "Namespaces exempt from policy, besides `kube-system`, `kube-public`, "
                                "`kube-node-lease` and meshguard's own `namespace`.",
    "policy.state.backoff_initial_seconds": "First retry delay after a failed list or watch (then doubled, with "
    "jitter).",
    "policy.state.backoff_max_seconds": "Longest retry delay.",
}

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
# Element validators (``Annotated[str, AfterValidator(f)]``) that say more than "string".
_VALIDATED = {
    "quantity": "quantity",
    "image": "image reference",
    "cidr": "CIDR",
    "include_range": "`*` or CIDR",
    "_valid_selector": "LabelSelector",
}


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    description: str


def configuration_reference() -> str:
    """The Markdown of the generated section: one table per top-level section of :class:`Settings`."""
    top = [name for name, field in Settings.model_fields.items() if _section(field) is None]
    blocks = ["### Top level", *_docstring(Settings), _table(_rows(Settings, "", only=top))]
    for name, field in Settings.model_fields.items():
        model = _section(field)
        if model is None:
            continue
        key = field.alias or name
        blocks.append(f"### `{key}`")
        blocks.extend(_docstring(model))
        for nested_key, nested in _nested_models(model, key):
            text = _docstring(nested)
            if text:
                blocks.append(f"`{nested_key}`: " + "\n\n".join(text))
        blocks.append(_table(_rows(model, key + ".")))
    return "\n\n".join(blocks) + "\n"


def replace_section(document: str, generated: str) -> str:
    """``document`` with the text between the markers replaced by ``generated``."""
    start = document.find(BEGIN)
    end = document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the document has no {BEGIN} ... {END} section")
    return document[: start + len(BEGIN)] + "\n\n" + generated.strip("\n") + "\n\n" + document[end:]


def all_keys() -> list[str]:
    return [row.key for row in _rows(Settings, "")]


def undocumented_in_source() -> set[str]:
    """Keys with neither a ``description=`` nor a comment in the source (the ones ``_NOTES`` may describe)."""
    return {row.key for row in _rows(Settings, "", notes=False) if not row.description}


def notes() -> dict[str, str]:
    return dict(_NOTES)


# --- rows -------------------------------------------------------------------------------------------------------


def _section(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _nested_models(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, type[BaseModel]]]:
    for name, field in model.model_fields.items():
        nested = _section(field)
        if nested is not None:
            key = f"{prefix}.{field.alias or name}"
            yield key, nested
            yield from _nested_models(nested, key)


def _rows(model: type[BaseModel], prefix: str, only: Sequence[str] | None = None, notes: bool = True) -> list[Row]:
    comments = _comments(model)
    rows: list[Row] = []
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        key = prefix + (field.alias or name)
        nested = _section(field)
        if nested is not None:
            rows.extend(_rows(nested, key + ".", notes=notes))
            continue
        description = field.description or comments.get(name, "")
        if not description and notes:
            description = _NOTES.get(key, "")
        rows.append(Row(key, _field_type(field), _default(key, field.default), _cell(description)))
    return rows


def _table(rows: list[Row]) -> str:
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    lines += [f"| `{r.key}` | {r.type} | {r.default} | {r.description} |" for r in rows]
    return "\n".join(lines)


# --- descriptions from the source -------------------------------------------------------------------------------


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment lines directly above it, for the model and the models it inherits from."""
    found: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls.__module__.startswith("pydantic"):
            continue
        try:
            lines, _ = inspect.getsourcelines(cls)
        except (OSError, TypeError):
            continue
        tree = ast.parse(textwrap.dedent("".join(lines)))
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                text = _comment_above(lines, node.lineno - 1)
                if text:
                    found[node.target.id] = text
    return found


def _comment_above(lines: list[str], index: int) -> str:
    block: list[str] = []
    i = index - 1
    while i >= 0 and lines[i].strip().startswith("#"):
        block.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    return " ".join(part for part in block if part)


def _docstring(model: type[BaseModel]) -> list[str]:
    doc = model.__dict__.get("__doc__")
    if not doc:
        return []
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return [_rst(" ".join(line.strip() for line in p.splitlines())) for p in paragraphs if p.strip()]


def _rst(text: str) -> str:
    return text.replace("``", "`").replace(":class:`", "`")


def _cell(text: str) -> str:
    return _rst(text).replace("|", "\\|")


# --- types and defaults -----------------------------------------------------------------------------------------


def _field_type(field: FieldInfo) -> str:
    return _type(field.annotation, list(field.metadata))


def _type(tp: Any, metadata: list[Any]) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extra = get_args(tp)
        return _type(base, metadata + extra)
    for item in metadata:
        if isinstance(item, FieldInfo):
            metadata = metadata + list(item.metadata)
    if origin is Literal:
        options = [f"`{_yaml(v)}`" for v in get_args(tp)]
        return " or ".join(options) if len(options) <= 2 else "one of " + ", ".join(options)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        named = [_type(a, metadata) for a in args if a is not type(None)]
        return " or ".join(named) + (" or `null`" if type(None) in args else "")
    if origin is tuple:
        element = get_args(tp)[0]
        text = f"list of {_type(element, [])}"
        return f"non-empty {text}" if any(_min_length(m) for m in metadata) else text
    name = "mapping" if origin is dict else _SCALARS.get(tp, getattr(tp, "__name__", str(tp)))
    for item in metadata:
        func = getattr(item, "func", None)
        if func is not None and getattr(func, "__name__", "") in _VALIDATED:
            name = _VALIDATED[func.__name__]
    bounds = _bounds(metadata, counts_length=tp is str)
    return f"{name}, {bounds}" if bounds else name


def _min_length(item: Any) -> bool:
    return isinstance(item, annotated_types.MinLen) and item.min_length > 0


def _bounds(metadata: list[Any], counts_length: bool) -> str:
    low: Any = None
    high: Any = None
    low_open = False
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low, low_open = item.gt, True
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif counts_length and isinstance(item, annotated_types.MinLen):
            low = item.min_length
        elif counts_length and isinstance(item, annotated_types.MaxLen):
            high = item.max_length
    prefix = "length " if counts_length else ""
    if low is not None and high is not None and not low_open:
        return f"{prefix}{low}–{high}"
    parts = []
    if low is not None:
        parts.append(f"{prefix}{'>' if low_open else '≥'} {low}")
    if high is not None:
        parts.append(f"{prefix}≤ {high}")
    return ", ".join(parts)


def _default(key: str, value: Any) -> str:
    text = f"`{_yaml(value)}`"
    if key.endswith("_bytes") and isinstance(value, int) and value % 1024 == 0:
        kib = value // 1024
        text += f" ({kib // 1024} MiB)" if kib % 1024 == 0 else f" ({kib} KiB)"
    return text


def _yaml(value: Any) -> str:
    """The value as it would be written in the YAML file (flow style: quoted where YAML would misread it)."""
    if isinstance(value, Path):
        value = str(value)
    elif isinstance(value, tuple):
        value = [str(v) if isinstance(v, Path) else v for v in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").strip()


# --- command ----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    path = Path(args[0]) if args else DOCUMENT
    try:
        document = path.read_text(encoding="utf-8")
        updated = replace_section(document, configuration_reference())
    except (OSError, ValueError) as exc:
        print(f"meshguard reference: {path}: {exc}", file=sys.stderr)
        return 2
    if updated == document:
        print(f"{path} is up to date")
        return 0
    path.write_text(updated, encoding="utf-8")
    print(f"rewrote the generated section of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The documentation stays true to the code: the generated configuration reference is current, and links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from webhook import reference

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+).*?\1", re.DOTALL)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The Markdown without code blocks and code spans, where a link or heading is only text."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """The heading anchors GitHub generates for a Markdown file (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_the_pages_exist() -> None:
    names = {p.name for p in DOCS.glob("*.md")}
    for name in ("quickstart", "concepts", "configuration", "helm", "operations", "security", "architecture",
                 "contributing", "benchmarks", "testing"):
        assert f"{name}.md" in names


def test_configuration_reference_is_current() -> None:
    document = (DOCS / "configuration.md").read_text(encoding="utf-8")
    expected = reference.replace_section(document, reference.configuration_reference())
    assert document == expected, (
        "docs/configuration.md's generated section differs from the settings models: "
        "run `python -m webhook.reference` and commit the result"
    )


def test_reference_lists_every_key() -> None:
    generated = reference.configuration_reference()
    for key in reference.all_keys():
        assert f"| `{key}` |" in generated


def test_reference_notes_describe_real_undocumented_keys() -> None:
    keys = set(reference.all_keys())
    undocumented = reference.undocumented_in_source()
    for key in reference.notes():
        assert key in keys, f"webhook/reference.py has a note for {key}, which is no setting: remove or rename it"
        assert key in undocumented, (
            f"{key} is now described in the source, so its note in webhook/reference.py is dead: remove it"
        )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("//"):
            continue  # http:, https:, mailto:...: not a file of this repository
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links: " + "; ".join(broken)

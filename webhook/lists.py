"""The one parser of comma-separated lists: annotations, the init and bootstrap containers' flags, CLI options."""

from __future__ import annotations


def split_list(text: str) -> list[str]:
    """Comma-separated items, each stripped; an empty string is an empty list (so an annotation can clear a
    default). Raises ``ValueError`` for an empty item, as in ``"a,,b"`` or ``"a,"``: a typo, not a choice."""
    items = [item.strip() for item in text.split(",")]
    if items == [""]:
        return []
    if "" in items:
        raise ValueError(f"{text!r} has an empty item")
    return items

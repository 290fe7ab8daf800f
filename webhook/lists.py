"""The one parser of comma-separated lists and of port numbers: annotations, the init and bootstrap containers'
flags, CLI options, policy keys."""

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


def port_number(text: str) -> int | None:
    """``text`` as a TCP port (1-65535), or None: ASCII digits only (``str.isdigit`` also takes "²", which ``int``
    refuses)."""
    if not (text.isascii() and text.isdigit()):
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None

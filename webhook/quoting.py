"""How a value the requester wrote appears in a message: as JSON, clipped, so that it reads like the manifest it
came from and a newline in it cannot start a line of its own."""

from __future__ import annotations

import json
from typing import Any


def clipped(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` - 1 characters and an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quoted(value: Any, limit: int = 60) -> str:
    """``value`` as JSON (a string in double quotes, escapes and all), cut to ``limit`` characters."""
    if isinstance(value, str):  # cut inside the quotes, so that they stay a pair
        return json.dumps(clipped(value, limit), ensure_ascii=False)
    return clipped(json.dumps(value, ensure_ascii=False, default=str), limit)

"""Boolean words as Vantiq and properties files send them. Kept apart from config.py so that worker
processes can parse requests' types without importing pydantic (a third of a worker's start-up)."""
from __future__ import annotations

from typing import Any

TRUE_WORDS = frozenset({"true", "yes", "t", "1", "y", "on"})
FALSE_WORDS = frozenset({"false", "no", "f", "0", "n", "off", ""})


def parse_bool(value: Any, *, name: str) -> bool:
    """Vantiq and properties files send booleans as words too: true/yes/t/1 (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ValueError(f"{name} must be true or false, not {value!r}")

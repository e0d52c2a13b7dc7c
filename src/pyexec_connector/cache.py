"""The compiled-code cache: a least-recently-used map of code objects keyed by name, each valid only for
the code text or document modification time it was compiled from."""
from __future__ import annotations

from dataclasses import dataclass
from types import CodeType
from typing import Any


@dataclass(frozen=True, slots=True)
class CachedCode:
    code: CodeType
    # What the entry was compiled from: the code text itself (comparing the text is an exact hash
    # check with no collisions, and costs one memcmp) or a document's modification time.
    fingerprint: Any


class CodeCache:
    """A plain dict kept in use order (a hit moves its entry to the end; the first is the least recently
    used): every operation is a dict operation in C, where an LRUCache's get is several Python calls, and
    a lookup is on every query."""

    def __init__(self, capacity: int = 128):
        if capacity < 1:
            raise ValueError("the code cache holds at least one entry")
        self._entries: dict[str, CachedCode] = {}
        self._capacity = capacity
        self.hits = 0
        self.misses = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str, fingerprint: Any = None, *, any_version: bool = False) -> CachedCode | None:
        """The entry for `name` if it was compiled from `fingerprint` (or any, for name-only queries)."""
        entries = self._entries
        entry = entries.pop(name, None)
        if entry is not None:
            entries[name] = entry       # the most recently used, whether it matches or not (as LRUCache did)
            if any_version or entry.fingerprint == fingerprint:
                self.hits += 1
                return entry
        self.misses += 1
        return None

    def put(self, name: str, code: CodeType, fingerprint: Any) -> None:
        entries = self._entries
        entries.pop(name, None)
        entries[name] = CachedCode(code, fingerprint)
        if len(entries) > self._capacity:
            del entries[next(iter(entries))]

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)

    def clear(self) -> None:
        self._entries.clear()

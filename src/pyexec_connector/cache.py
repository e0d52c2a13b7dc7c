"""The compiled-code cache: least recently used code objects by name, each valid only for the code text
or document modification time it was compiled from."""
from __future__ import annotations

from collections import OrderedDict
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
    """An OrderedDict rather than cachetools' LRUCache: a hit, which every query of cached code makes,
    then stays in C instead of going through Python-level methods."""

    def __init__(self, capacity: int = 128):
        self._entries: OrderedDict[str, CachedCode] = OrderedDict()
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
        entry = entries.get(name)
        if entry is not None and (any_version or entry.fingerprint == fingerprint):
            entries.move_to_end(name)
            self.hits += 1
            return entry
        self.misses += 1
        return None

    def put(self, name: str, code: CodeType, fingerprint: Any) -> None:
        entries = self._entries
        entries[name] = CachedCode(code, fingerprint)
        entries.move_to_end(name)
        while len(entries) > self._capacity:
            entries.popitem(last=False)

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)

    def clear(self) -> None:
        self._entries.clear()

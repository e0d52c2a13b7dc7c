"""The compiled-code cache: an LRU (cachetools) of code objects keyed by name, each valid only for the
code text or document modification time it was compiled from."""
from __future__ import annotations

from dataclasses import dataclass
from types import CodeType
from typing import Any

from cachetools import LRUCache


@dataclass(frozen=True, slots=True)
class CachedCode:
    code: CodeType
    # What the entry was compiled from: the code text itself (comparing the text is an exact hash
    # check with no collisions, and costs one memcmp) or a document's modification time.
    fingerprint: Any


class CodeCache:
    def __init__(self, capacity: int = 128):
        self._entries: LRUCache[str, CachedCode] = LRUCache(maxsize=capacity)
        self.hits = 0
        self.misses = 0

    @property
    def capacity(self) -> int:
        return int(self._entries.maxsize)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str, fingerprint: Any = None, *, any_version: bool = False) -> CachedCode | None:
        """The entry for `name` if it was compiled from `fingerprint` (or any, for name-only queries)."""
        try:
            entry = self._entries[name]     # one call fewer than LRUCache.get on the hit every query makes
        except KeyError:
            entry = None
        if entry is not None and (any_version or entry.fingerprint == fingerprint):
            self.hits += 1
            return entry
        self.misses += 1
        return None

    def put(self, name: str, code: CodeType, fingerprint: Any) -> None:
        self._entries[name] = CachedCode(code, fingerprint)

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)

    def clear(self) -> None:
        self._entries.clear()

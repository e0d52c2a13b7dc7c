"""When a worker should retire: after `maxQueriesPerWorker` queries (with jitter) or once its resident
memory passes `maxWorkerMemoryMB`, checked after each query. Pure: the pool asks, and acts on the answer
(the worker takes no new queries, finishes what it runs, and is replaced).

The jitter (±10 %) is what gunicorn's `max_requests_jitter` is for: workers started together would
otherwise reach their limit together and all be replaced at once."""
from __future__ import annotations

import dataclasses
import enum
import os
import random
from typing import Any

JITTER = 0.10
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class RecycleReason(enum.StrEnum):
    """Why a worker retired (the label of the recycles metric)."""

    QUERIES = "queries"
    MEMORY = "memory"


def jittered(limit: int, rng: random.Random | None = None, fraction: float = JITTER) -> int:
    """`limit` moved by up to ±`fraction` of itself, at least 1; 0 (never) stays 0."""
    if limit <= 0:
        return 0
    spread = limit * fraction
    return max(1, round(limit + (rng or random).uniform(-spread, spread)))


@dataclasses.dataclass(frozen=True, slots=True)
class RecyclePolicy:
    """A source's recycling limits; 0 turns a limit off."""

    max_queries: int = 0
    max_memory_bytes: int = 0
    jitter: float = JITTER

    @classmethod
    def from_config(cls, config: Any) -> RecyclePolicy:
        """From a SourceConfig (maxQueriesPerWorker, maxWorkerMemoryMB)."""
        return cls(max_queries=config.maxQueriesPerWorker, max_memory_bytes=config.maxWorkerMemoryMB * 1024 * 1024)

    @property
    def watches_memory(self) -> bool:
        """Whether the pool needs a worker's resident memory after its queries."""
        return self.max_memory_bytes > 0

    def budget(self, rng: random.Random | None = None) -> WorkerBudget:
        """A new worker's budget: its own query limit is drawn once, at its start."""
        return WorkerBudget(self, jittered(self.max_queries, rng, self.jitter))


@dataclasses.dataclass(slots=True)
class WorkerBudget:
    """One worker's account: queries it finished, and whether it has been told to retire."""

    policy: RecyclePolicy
    query_limit: int                      # 0: never
    queries: int = 0
    retiring: RecycleReason | None = None
    limited: bool = dataclasses.field(init=False)     # a limit is set: after_query() has something to check

    def __post_init__(self) -> None:
        self.limited = bool(self.query_limit or self.policy.max_memory_bytes)

    def after_query(self, resident_bytes: int | None = None) -> RecycleReason | None:
        """Count one finished query. Returns the reason the first time the worker is past a limit, else None
        (None again after that: it is retiring already). `resident_bytes`: its memory now, None if unknown."""
        self.queries += 1
        if self.retiring is not None:
            return None
        if self.query_limit and self.queries >= self.query_limit:
            self.retiring = RecycleReason.QUERIES
        elif self.policy.max_memory_bytes and resident_bytes is not None \
                and resident_bytes > self.policy.max_memory_bytes:
            self.retiring = RecycleReason.MEMORY
        return self.retiring


def resident_bytes(pid: int) -> int | None:
    """A process's resident memory (Linux /proc/PID/statm: one small read), None when it cannot be read.
    For a worker forked from a zygote this includes the preloaded pages it shares with its siblings."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fp:
            return int(fp.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None

"""How many workers a source runs: `minWorkers` always, more as load arrives, up to `workers`, and those
beyond `minWorkers` end after `workerIdleSeconds` without a query. Pure: the pool reports what it has and
starts or stops what this decides, so the decision is made in one place.

A new worker is wanted as soon as a query finds every worker busy, not when every worker is full: a
worker takes `queriesPerWorker` queries at once, but a query in synchronous code holds its worker's loop,
and two such queries on one worker run one after the other while a second core idles. Below `workers`,
such a query waits for a fork (milliseconds, from the zygote); at `workers`, it shares a busy worker."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

W = TypeVar("W")


@dataclasses.dataclass(frozen=True, slots=True)
class ScalePolicy:
    min_workers: int
    max_workers: int
    idle_seconds: float

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers or self.max_workers < 1 or self.idle_seconds <= 0:
            raise ValueError(f"not a worker range: {self.min_workers}..{self.max_workers}, idle {self.idle_seconds}")

    @classmethod
    def from_config(cls, config: Any) -> ScalePolicy:
        """From a SourceConfig (minWorkers, workers, workerIdleSeconds)."""
        return cls(config.min_worker_count, config.worker_count, config.workerIdleSeconds)

    def to_start(self, live: int, busy: int, waiting: int = 0) -> int:
        """Workers to start now. `live`: running or starting; `busy`: running ones with at least one query
        (a starting worker is not busy: it will take the next query); `waiting`: queries that found no
        idle worker. Each waiting query not covered by an idle or starting worker gets a new one."""
        idle = live - busy
        wanted = max(self.min_workers, live, live + waiting - idle)
        return max(0, min(wanted, self.max_workers) - live)

    def to_retire(self, idle_since: Mapping[W, float | None], now: float) -> list[W]:
        """Workers to stop: idle (`idle_since` is when each last went idle; None: it has queries) for
        `idle_seconds` or more, longest idle first, keeping `min_workers` running."""
        spare = len(idle_since) - self.min_workers
        if spare <= 0:
            return []
        expired = sorted((since, index) for index, since in enumerate(idle_since.values())
                         if since is not None and now - since >= self.idle_seconds)
        workers = list(idle_since)
        return [workers[index] for _, index in expired[:spare]]

    def next_check(self, idle_since: Mapping[Any, float | None], now: float) -> float | None:
        """When to_retire() may next have something to say (a loop time), None while nothing is spare."""
        if len(idle_since) <= self.min_workers:
            return None
        idle = [since for since in idle_since.values() if since is not None]
        return min(idle) + self.idle_seconds if idle else None

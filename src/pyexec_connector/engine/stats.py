"""What an engine tells the operator: one typed snapshot, read by /metrics, /healthz and tests.

A figure an engine has nothing to count for is None (the inline engine has no workers and no queue),
not 0: /metrics then leaves its series out instead of reporting a pool that does not exist."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineStats:
    """One engine's figures at one moment (Engine.stats()). Counters count over the engine's life."""

    can_run: bool = True                      # the source can run code now (or a worker can be forked for it)
    workers_alive: int | None = None          # processes alive or starting; None: the engine has no workers
    worker_restarts: int = 0
    timeouts: int = 0                         # queries stopped for running past their time limit
    queue_depth: int | None = None            # queries waiting for a worker; None: the engine has no queue
    queued_bytes: int | None = None           # what those cost (bounded by maxQueuedBytes)
    busy: int = 0                             # queries refused "busy" (the queue was full)
    busy_waited_timeout: int = 0              # queries that timed out while waiting in the queue
    cache_hits: int = 0                       # compiled-code cache, over every worker the engine had
    cache_misses: int = 0
    cache_size: int = 0
    cache_capacity: int = 0
    worker_recycles: Mapping[str, int] | None = None    # reason ("queries", "memory") -> workers replaced
    worker_forks: int | None = None
    worker_spawns: int | None = None
    worker_idle_retired: int | None = None
    worker_wedged: int | None = None
    queries_requeued: int | None = None
    queries_spilled: int | None = None
    query_processes_ended: int | None = None  # processes queries left running, ended with them (issue 21)
    # pull with credit (process engine): runs workers asked for and were not sent yet; runs sent beyond
    # what was asked for (0, always: a test and an operator can see it stays so)
    credit: int | None = None
    credit_overdrawn: int | None = None
    # which way queries reached the engine, for tests and debugging (not exported)
    relayed: int = 0                          # the frame relayed as it came (the worker read the WITH clause)
    parsed: int = 0                           # parsed in the connector
    accepted_frames: int = 0                  # frames workers' code sent for the link, taken into the outbox
    timeouts_pending: bool = False            # a timeout sweep is scheduled (a query with a limit runs)

"""Dispatcher: which worker takes a query, and the queue of queries waiting for one.

A query goes to the least-busy worker that takes work; when every worker has `queriesPerWorker`
queries, it waits in a queue of at most `maxQueuedQueries`, and beyond that it is answered "busy" at
once. Flow control by bytes (issue 12) replaces that count here."""
from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from .. import errors
from ..errors import QueryError
from .pool import WorkerHandle, WorkerPool, WorkerState

_READY = WorkerState.READY


class Dispatcher:
    def __init__(self, pool: WorkerPool, per_worker: int, max_queued: int):
        self._pool = pool
        self.per_worker = per_worker
        self.max_queued = max_queued
        self._waiting: deque[asyncio.Future] = deque()

    @property
    def depth(self) -> int:
        return len(self._waiting)

    def free_worker(self) -> WorkerHandle | None:
        """The least-busy worker that takes a query now, if no query waits before this one."""
        return None if self._waiting else self._least_busy()

    def _least_busy(self) -> WorkerHandle | None:
        best = None
        for worker in self._pool.workers:
            if worker.state is _READY and worker.load < self.per_worker:
                if best is None or worker.load < best.load:
                    best = worker
        return best

    async def acquire(self) -> WorkerHandle:
        """A worker for one query (waiting in the queue if need be); raises QueryError (busy, no worker)."""
        while True:
            worker = self.free_worker()
            if worker is not None:
                return worker
            if len(self._waiting) >= self.max_queued:
                running = sum(len(w.inflight) for w in self._pool.workers)
                raise QueryError(errors.BUSY, "The source {0} is busy: {1} queries are running and {2} are "
                                              "waiting (maxQueuedQueries). Try again later.",
                                 [self._pool.source_name, running, len(self._waiting)])
            ticket = asyncio.get_running_loop().create_future()
            self._waiting.append(ticket)
            self.dispatch()
            try:
                worker = await ticket
            except asyncio.CancelledError:
                if ticket.done() and not ticket.cancelled() and ticket.exception() is None:
                    ticket.result().reserved -= 1
                    self.dispatch()
                else:
                    with contextlib.suppress(ValueError):
                        self._waiting.remove(ticket)
                raise
            worker.reserved -= 1
            if worker.alive:
                return worker

    def dispatch(self) -> None:
        """Give waiting queries the workers that can take them now."""
        while self._waiting:
            worker = self._least_busy()
            if worker is None:
                return
            ticket = self._waiting.popleft()
            if ticket.done():
                continue
            worker.reserved += 1
            ticket.set_result(worker)

    def fail_waiting(self, error: QueryError) -> None:
        while self._waiting:
            ticket = self._waiting.popleft()
            if not ticket.done():
                ticket.set_exception(error)

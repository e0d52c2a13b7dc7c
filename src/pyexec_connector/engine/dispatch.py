"""Dispatcher: which worker takes a query, and the queue of queries waiting for one.

A query goes to the least-busy worker that takes work; when every worker has `queriesPerWorker`
queries, it waits. Waiting is queued by cost, not by count (issue 12): a plain query waits as the frame
it came in (no Job, no task), and each waiting query is charged its frame's bytes plus a fixed
`ENTRY_COST` for its record. "Busy" is answered only
- when the waiting queries' bytes would pass `maxQueuedBytes`,
- when `maxQueuedQueries` is set and that many already wait (an explicit cap; none by default),
- when a query has waited its whole timeout without a worker taking it (it would start with none left).
Everything else waits, in order of arrival."""
from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import time
from collections import deque

from .. import errors
from ..errors import QueryError
from .pool import WorkerHandle, WorkerPool

# What a waiting query costs beyond its frame: its ReplyChannel, QueryFrame, parsed WITH dict and this
# record, rounded up (the measured figure is in docs/PERFORMANCE.md, "Queueing by cost").
ENTRY_COST = 1024
SWEEP_INTERVAL = 0.1      # seconds between checks for waiting queries whose timeout passed


@dataclasses.dataclass(eq=False, slots=True)
class Waiting:
    """One query waiting for a worker, whoever waits on its `ticket` (a parsed query's task, or whoever
    queued a frame or a query taken back): it resolves to the worker (reserved for it: the taker lowers
    `reserved`), or to the busy QueryError. Nothing here calls the taker."""
    cost: int
    since: float
    limit: float | None
    ticket: asyncio.Future
    gone: bool = False        # taken out of the queue (timeout passed, or cancelled): skipped there


class Dispatcher:
    def __init__(self, pool: WorkerPool, per_worker: int, max_queued: int | None, max_queued_bytes: int):
        self._pool = pool
        self.per_worker = per_worker
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self._waiting: deque[Waiting] = deque()
        self._count = 0               # entries in _waiting not gone
        self._deadlines: list[tuple[float, int, Waiting]] = []     # a heap: one push per query, no scans
        self._order = itertools.count()
        self.queued_bytes = 0
        self.busy = 0                 # queries answered busy (any reason)
        self.expired_waiting = 0      # of those, queries whose timeout passed while they waited
        self._sweeping: asyncio.TimerHandle | None = None

    @property
    def depth(self) -> int:
        return self._count

    def free_worker(self, prefer: WorkerHandle | None = None) -> WorkerHandle | None:
        """The worker that takes a query now, if no query waits before this one: `prefer` (the one that
        compiled the query's name: affinity) whenever it asked for work and its loop turned since it read
        its last run (not held by synchronous code), or it is in the midst of a turn it keeps pace with
        (see _least_busy); else the least busy."""
        if self._count:
            return None
        if prefer is not None and prefer.takes(self.per_worker) >= 0 and (
                prefer.channel.received == prefer.channel.sent
                or prefer.awaiting and prefer.keeps_pace(time.monotonic())):
            return prefer
        return self._least_busy()

    def _least_busy(self) -> WorkerHandle | None:
        """The first worker in the pool's order that is idle (nothing held, or only queries that already
        sent their terminal reply: their runs end in a moment), or in the midst of a turn while it keeps pace
        (its turns take less than handle.PACE: the runs held for it go out as soon as it answers): so a
        sequence of queries keeps to one worker and its compiled code, as upstream's one process does,
        and quick runs go to one loop in batches rather than wake every worker, while a query that
        finds a worker holding only long-running (awaiting) queries goes to an idle one if there is
        one (a crash costs fewer queries). A worker in a slow turn (passed PACE, or after one that did)
        gets nothing until it answers: the query waits in the queue for whichever worker answers first.
        Else, when the pool cannot grow,
        the least-busy one with credit (below `workers` a query that finds every worker busy waits for a
        fork: see scaling.py). Nothing goes to a worker beyond the credit it granted, nor beyond
        `queriesPerWorker` at once."""
        best = None
        per_worker = self.per_worker
        best_load = 0
        now = time.monotonic()
        for worker in self._pool.workers:
            load = worker.takes(per_worker)
            if load < 0:
                continue
            if load == worker.replied:     # (every run it holds replied: it read them all)
                return worker
            if worker.awaiting or worker.reserved:     # in a turn (or given runs for one): more only while quick
                if worker.keeps_pace(now):
                    return worker
                continue
            if best is None or load < best_load:
                best, best_load = worker, load
        if best is not None and self._pool.can_grow():
            return None
        return best

    # ---- admission --------------------------------------------------------------------------
    def _admit(self, cost: int, limit: float | None) -> Waiting:
        """A place in the queue, or the busy QueryError naming the limit that is reached."""
        waiting = self._count
        # a query waiting for a fork (below `workers`) is not one maxQueuedQueries counts: it would have
        # run at once on a busy worker before workers were forked on demand
        if self.max_queued is not None and waiting >= self.max_queued and not self._pool.can_grow():
            self._refused()
            raise QueryError(errors.BUSY, "The source {0} is busy: {1} queries are running and {2} are "
                                          "waiting (maxQueuedQueries {3}). Try again later.",
                             [self._pool.source_name, self._running(), waiting, self.max_queued])
        if self.queued_bytes + cost > self.max_queued_bytes:
            self._refused()
            raise QueryError(errors.BUSY, "The source {0} is busy: {1} queries are running and {2} are "
                                          "waiting, holding {3} bytes (maxQueuedBytes {4}). Try again later.",
                             [self._pool.source_name, self._running(), waiting, self.queued_bytes,
                              self.max_queued_bytes])
        loop = asyncio.get_running_loop()
        entry = Waiting(cost, loop.time(), limit or None, loop.create_future())
        self._waiting.append(entry)
        self._count += 1
        self.queued_bytes += cost
        if entry.limit is not None:
            heapq.heappush(self._deadlines, (entry.since + entry.limit, next(self._order), entry))
            if self._sweeping is None:
                self._sweeping = loop.call_later(SWEEP_INTERVAL, self._sweep)
        return entry

    def _remove(self, entry: Waiting) -> None:
        entry.gone = True
        self._count -= 1
        self.queued_bytes -= entry.cost

    def _refused(self) -> None:
        self.busy += 1

    def _running(self) -> int:
        return sum(len(w.inflight) for w in self._pool.workers)

    def wait(self, cost: int, limit: float | None) -> asyncio.Future:
        """A place in the queue for a query that waits as it is (a frame: no task, no Job): the ticket
        resolves to its worker (see Waiting); raises the busy QueryError."""
        ticket = self._admit(cost, limit).ticket
        self.dispatch()
        return ticket

    async def acquire(self, cost: int = ENTRY_COST, limit: float | None = None,
                      prefer: WorkerHandle | None = None) -> WorkerHandle:
        """A worker for one parsed query (waiting in the queue if need be; `prefer`: see free_worker);
        raises QueryError (busy, no worker)."""
        while True:
            worker = self.free_worker(prefer)
            if worker is not None:
                return worker
            entry = self._admit(cost, limit)
            ticket = entry.ticket
            self.dispatch()
            try:
                worker = await ticket
            except asyncio.CancelledError:
                if ticket.done() and not ticket.cancelled() and ticket.exception() is None:
                    ticket.result().reserved -= 1
                    self.dispatch()
                elif not entry.gone:
                    self._remove(entry)
                raise
            worker.reserved -= 1
            if worker.alive:
                return worker

    # ---- giving out workers -----------------------------------------------------------------
    def dispatch(self) -> None:
        """Give waiting queries the workers that can take them now; the runs for one worker go out in one
        write."""
        waiting = self._waiting
        if not waiting:
            return
        try:
            self._dispatch(waiting)
        finally:
            for worker in self._pool.workers:
                worker.flush()

    def _dispatch(self, waiting: deque[Waiting]) -> None:
        while waiting:
            worker = self._least_busy()
            if worker is None:
                if self._count:
                    self._pool.scale(self._count)
                return
            entry = waiting.popleft()
            if entry.gone:
                continue
            self._remove(entry)
            if not entry.ticket.done():
                worker.reserved += 1
                entry.ticket.set_result(worker)

    def wait_again(self, cost: int) -> asyncio.Future:
        """A place first in line for a query taken back from a worker that never read it (it was admitted
        already; its own deadline still runs): its ticket, as wait()'s."""
        loop = asyncio.get_running_loop()
        entry = Waiting(cost, loop.time(), None, loop.create_future())
        self._waiting.appendleft(entry)
        self._count += 1
        self.queued_bytes += cost
        return entry.ticket

    def _fail(self, entry: Waiting, error: QueryError) -> None:
        if not entry.ticket.done():
            entry.ticket.set_exception(error)

    def _sweep(self) -> None:
        """Busy for the queries whose timeout passed while they waited: nothing of theirs ran, and a
        worker taking them now would start them with no time left."""
        self._sweeping = None
        loop = asyncio.get_running_loop()
        now, heap = loop.time(), self._deadlines
        while heap and (heap[0][2].gone or heap[0][0] <= now):
            entry = heapq.heappop(heap)[2]
            if entry.gone:
                continue
            self._remove(entry)
            self.busy += 1
            self.expired_waiting += 1
            self._fail(entry, QueryError(
                errors.BUSY, "The source {0} is busy: the query waited {1} s for a worker, its whole "
                             "timeout (WITH timeout or executionTimeout), and did not start. Try again later.",
                [self._pool.source_name, round(now - entry.since, 3)]))
        if not self._count:
            self._waiting.clear()
            heap.clear()
        elif heap:
            self._sweeping = loop.call_later(SWEEP_INTERVAL, self._sweep)

    def fail_waiting(self, error: QueryError) -> None:
        while self._waiting:
            entry = self._waiting.popleft()
            if not entry.gone:
                self._remove(entry)
                self._fail(entry, error)
        self._deadlines.clear()

    def close(self) -> None:
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None

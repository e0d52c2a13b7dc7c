"""The queries of a process engine's pool: one `Query` record each, from the moment a worker is chosen for
it to its terminal reply, and what each message from a worker does to them (QueryBook). The processes
are WorkerPool's (pool.py), the waiting Dispatcher's (dispatch.py), the way in ProcessEngine's
(process.py); the end of a query, Pipeline.finish's."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Protocol

from .. import errors, protocol
from ..errors import QueryError
from ..reply import ReplyChannel
from . import reaper, wire
from .base import Job, Outcome
from .dispatch import ENTRY_COST, Dispatcher
from .handle import PACE, WorkerHandle
from .messages import (
    ACCEPT_EVERY,
    Accepted,
    Answered,
    Cancel,
    Cancelled,
    Credit,
    Declined,
    Done,
    Failed,
    LinkFrame,
    ProcessesEnded,
    Reply,
)
from .pipeline import Deadlines, Pipeline, timeout_error
from .pool import WorkerPool

log = logging.getLogger("pyexec_connector.engine.process")

KILL_GRACE = 2.0          # seconds a worker has to give up a timed-out query before it is killed
# Seconds a worker has to read a run it asked for: a run it has not read by then goes to another worker
# (it declines it, should it read it later). A few hundred round trips of the pipe: only a loop blocked
# by code misses it, or a machine so loaded that another worker is as good.
TAKE_BOUND = 0.25
_COMPILE_ERRORS = frozenset({errors.SYNTAX_ERROR, errors.GUARD_VIOLATION})


class LinkOutlet(Protocol):
    """The part of the source's link the engine uses (SourceLink)."""

    def send(self, frame: str) -> None: ...
    async def drained(self) -> None: ...
    def is_drained(self) -> bool: ...
    def write_soon(self) -> None: ...
    def write_now(self) -> None: ...


class NameBook:
    """What each cached name's code is (as the connector last saw it run), so that a name-only query can
    run on any worker, also one that never saw the code."""

    def __init__(self, capacity: int, misses: int = 0):
        # least recently used first; an OrderedDict, as remember() runs per query
        self._known: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        self._holders: dict[str, WorkerHandle] = {}     # a plain dict: read and written per query
        self._capacity = capacity
        self.misses = misses        # name-only queries for a name nobody knew

    def holder(self, name: str | None) -> WorkerHandle | None:
        """The worker last sent a query of this name: it has compiled it, or is compiling it (affinity)."""
        return self._holders.get(name) if name is not None else None

    def held_by(self, name: str | None, worker: WorkerHandle) -> None:
        holders = self._holders
        if name is not None and holders.get(name) is not worker:
            if len(holders) >= 2 * self._capacity:      # bounded: the oldest half goes
                for stale in list(holders)[:self._capacity]:
                    del holders[stale]
            holders[name] = worker

    def __len__(self) -> int:
        return len(self._known)

    @property
    def capacity(self) -> int:
        return self._capacity

    def text(self, name: str) -> str | None:
        known = self._known.get(name)
        if known is None:
            return None
        self._known.move_to_end(name)
        return known[0]

    def with_source(self, job: Job) -> Job:
        """The job, a name-only one carrying the code text the name was last run with."""
        request = job.request
        key = request.cache_key
        if key is None:
            return job
        if request.replace:
            self._known.pop(key, None)
        if job.source_text is not None:
            return job
        known = self._known.get(key)
        if known is not None:
            self._known.move_to_end(key)
        else:
            self.misses += 1
            raise QueryError(errors.NO_CACHE, "No code is cached under the name {0}; send the code with it.",
                             [key])
        return Job(request, known[0], known[1], job.runtime_info, job.timeout, job.rich_results)

    def remember(self, known: tuple[str, str, Any] | None) -> None:
        if known is not None:
            name, text, fingerprint = known
            entries = self._known
            entries[name] = (text, fingerprint)
            entries.move_to_end(name)
            if len(entries) > self._capacity:
                entries.popitem(last=False)


@dataclasses.dataclass(eq=False, slots=True)
class Query:
    """One query from the moment a worker is chosen for it to its end: the same record whether the worker
    or the connector read its WITH clause (`message` is then a Relay or a Run)."""
    qid: int
    channel: ReplyChannel
    future: asyncio.Future | None       # a parsed query's, its task awaits it; None: QueryBook ends it (relayed)
    worker: WorkerHandle
    limit: float | None = None                  # its timeout, seconds
    deadline: float = 0.0                       # loop time its timeout passes (0.0: none); see Deadlines
    known: tuple[str, str, Any] | None = None   # (name, code text, fingerprint) for the name book once it ran
    message: Any = None                         # its Relay or Run (sent again to another, see requeue)
    size: int = 0                               # its message's bytes
    replied: bool = False                       # its code sent its terminal reply; its run has not ended yet
    ended: bool = False                         # concluded (its end went to its future, or to Pipeline.finish)


class LinkAcks:
    """The frames workers' code sent for the link (Reply, LinkFrame), taken into the outbox (only while it
    has room), told to each worker every ACCEPT_EVERY characters: its awaited sends wait once it is
    ACCEPT_WINDOW ahead (flow control reaches user code)."""

    def __init__(self) -> None:
        self.frames = 0
        self._owed: dict[WorkerHandle, int] = {}     # characters taken from each worker, not told yet

    def accepted(self, worker: WorkerHandle, size: int) -> None:
        self.frames += 1
        owed = self._owed.get(worker, 0) + size
        if owed >= ACCEPT_EVERY:
            self._owed[worker] = 0
            worker.send(Accepted(owed))
        else:
            self._owed[worker] = owed

    def forget(self, worker: WorkerHandle) -> None:
        self._owed.pop(worker, None)


def _processes_ended(source_name: str, worker: WorkerHandle, message: ProcessesEnded) -> int:
    """The count a worker reports of processes a query left running that it ended (issue 21), logged."""
    count = message.processes
    if type(count) is not int or count < 0 or type(message.reply_address) is not str:
        raise ValueError("a ProcessesEnded without a count")
    log.info("source %s: query %s ended with %d process%s it started still running (worker %d): sent "
             "SIGTERM, SIGKILL after %g s (keepChildProcesses: false)", source_name,
             message.reply_address[:200], count, "" if count == 1 else "es", worker.index, reaper.GRACE)
    return count


class QueryBook:
    """Every query a pool's workers hold (WorkerHandle.inflight), their deadlines, and what each message
    from a worker does to them; the runs a worker did not read in time are taken back here."""

    def __init__(self, source_name: str, pool: WorkerPool, dispatcher: Dispatcher, link: LinkOutlet,
                 names: NameBook, pipeline: Pipeline):
        self.source_name = source_name
        self._pipeline = pipeline       # where a relayed query ends (Pipeline.finish), as a parsed one's task does
        self.pool = pool
        self.dispatcher = dispatcher
        self._link = link
        self.names = names
        self.closed = False
        self.deadlines = Deadlines(self._expire, self.running)
        self.timeouts = 0
        self.requeued = 0           # runs taken back from a worker that did not read them in time, declined, or ended
        self.spilled = 0            # runs held for a worker behind its pace, given to another before it saw them
        self.acks = LinkAcks()
        self.processes_ended = 0    # processes queries left running, ended by their workers (issue 21)
        self._checking: asyncio.TimerHandle | None = None     # the next _take_back
        self._answered: list[tuple[WorkerHandle, int]] = []     # runs whose reply went out, to end (end_answered)
        # the loop, kept: on Python 3.11 asyncio.get_running_loop() makes a getpid() system call, per query here
        self._loop: asyncio.AbstractEventLoop | None = None

    def running(self) -> Iterator[Query]:
        for worker in self.pool.workers:
            yield from worker.inflight.values()

    def register(self, worker: WorkerHandle, qid: int, channel: ReplyChannel, limit: float | None,
                  known: tuple[str, str, Any] | None, message: Any, size: int, flush: bool = True,
                  awaited: bool = False) -> Query:
        """The query becomes the worker's (its death or close() answers it) and its message goes out.
        `awaited`: a task awaits its `future` and settles it; else the book ends it (`_conclude`)."""
        loop = self._loop = self._loop or asyncio.get_running_loop()
        query = Query(qid, channel, loop.create_future() if awaited else None, worker, limit, 0.0, known, message,
                      size)
        self.send(worker, query, flush)
        if limit:
            self.deadlines.watch(query, limit, loop)
        return query

    def send(self, worker: WorkerHandle, query: Query, flush: bool) -> None:
        """The query's run to `worker`, against its credit, to be read within TAKE_BOUND."""
        take_by = time.monotonic() + TAKE_BOUND
        query.worker = worker
        worker.inflight[query.qid] = query
        worker.channel.send_run(wire.encode_run(query.message, take_by), query.qid, take_by)
        if flush:
            worker.flush()
        if worker.awaiting and worker.pace_check is None:     # held for it: moved if its turn passes PACE
            worker.pace_check = (self._loop or asyncio.get_running_loop()).call_later(
                PACE - (time.monotonic() - worker.awaiting_since), self._check_pace, worker)
        if self._checking is None:
            self._checking = (self._loop or asyncio.get_running_loop()).call_later(TAKE_BOUND + 0.02, self._take_back)

    def _check_pace(self, worker: WorkerHandle) -> None:
        """A worker's turn passed PACE: what is held for it goes to whoever is free (spill)."""
        worker.pace_check = None
        if worker.alive and worker.awaiting and worker.channel.runs_queued and not self.closed:
            left = PACE - (time.monotonic() - worker.awaiting_since)
            if left > 0:        # a later turn: its own PACE
                worker.pace_check = asyncio.get_running_loop().call_later(left, self._check_pace, worker)
            else:
                self.spill(worker)

    def _take_back(self) -> None:
        """The runs whose workers did not read them in time go to other workers (WorkerHandle.overdue)."""
        self._checking = None
        now = time.monotonic()
        pending = False
        for worker in self.pool.workers:
            if worker.channel.unconfirmed:
                late = worker.overdue(now, worker.inflight)
                if late:
                    log.info("source %s: worker %d did not read %d queries within %g s; they go to another "
                             "worker", self.source_name, worker.index, len(late), TAKE_BOUND)
                    self.requeue(worker, late)
                pending = pending or bool(worker.channel.unconfirmed)
        if pending and not self.closed:
            self._checking = asyncio.get_running_loop().call_later(TAKE_BOUND / 2, self._take_back)

    def _conclude(self, query: Query, outcome: Outcome | None, error: BaseException | None) -> None:
        """A query's end, once: to the task awaiting its future, or (relayed) through the same verdict
        straight to Pipeline.finish."""
        if query.ended:
            return
        query.ended = True
        future = query.future
        if future is not None:
            if not future.done():
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(outcome)
            return
        try:
            outcome = self.verdict(query, outcome, error)
        except (Exception, asyncio.CancelledError) as exc:     # noqa: BLE001 - each is answered
            self._pipeline.fail(query.channel, exc)
        else:
            self._pipeline.finish(query.channel, outcome)

    def settle(self, query: Query) -> Outcome:
        """The end of a parsed query whose future is done (its awaiting task's): see verdict."""
        future = query.future
        assert future is not None
        query.ended = True
        if future.cancelled():
            return self.verdict(query, None, asyncio.CancelledError())
        error = future.exception()
        return self.verdict(query, future.result() if error is None else None, error)

    def verdict(self, query: Query, outcome: Outcome | None, error: BaseException | None) -> Outcome:
        """What a query's end answers: its Outcome, or the QueryError to answer with (a timeout, a
        worker's death, the code's error). Raises CancelledError for a query the connector stopped
        waiting for (the worker is told to stop it)."""
        if error is None:
            if query.known is not None:
                self.names.remember(query.known)
            assert outcome is not None
            return outcome
        if isinstance(error, asyncio.CancelledError):
            self._abandon(query, "the connector stopped waiting for it")
            raise asyncio.CancelledError
        if isinstance(error, Expired):
            self.timeouts += 1
            self._abandon(query, f"its timeout of {query.limit:g} s passed")
            raise timeout_error(query.limit)
        if isinstance(error, QueryError) and error.code not in _COMPILE_ERRORS:
            self.names.remember(query.known)
        raise error

    def _expire(self, query: Query) -> None:
        self._conclude(query, None, Expired())      # answered, and the run stopped (verdict)

    def _abandon(self, query: Query, why: str) -> None:
        """Stop a query nobody waits for; kill its worker if it does not let go in time. Until it does,
        the worker takes nothing new (it may be stuck in synchronous code)."""
        worker = query.worker
        if not worker.alive or query.qid not in worker.inflight:
            return
        worker.send(Cancel(query.qid))
        worker.cancelling.add(query.qid)
        self.pool.hold(worker)
        reason = f"it did not stop the query {query.channel.reply_address} within {KILL_GRACE:g} s after {why}"

        def kill_if_stuck() -> None:
            if worker.alive and query.qid in worker.inflight:
                log.warning("source %s: killing worker %d: %s", self.source_name, worker.index, reason)
                worker.kill(f"the connector stopped it: {reason}")

        asyncio.get_running_loop().call_later(KILL_GRACE, kill_if_stuck)

    def handle(self, worker: WorkerHandle, message: Any) -> None:
        kind = type(message)
        if kind is Answered:
            # The worker built the whole 200 reply: it goes out as it came, before the run ends (the
            # completion then has nothing to build). Kept for speed: see docs/PERFORMANCE.md.
            qid, frame, worker.cache_counts = message
            query = worker.inflight.get(qid)
            if query is not None and not query.ended and (query.future is None or not query.future.done()):
                query.channel.forward(frame, True, protocol.STATUS_COMPLETE)
            # its end waits for end_answered(): the reply is written first (the intake writes the link after
            # each read), the bookkeeping after, off the reply's path
            self._answered.append((worker, qid))
        elif kind is Credit:      # checked by the worker's channel: it asks for more runs (once per turn)
            self.dispatcher.dispatch()
        elif kind is Reply:
            query = worker.inflight.get(message.qid)
            if query is None:
                log.warning("source %s: reply %s from worker %d for a finished query dropped",
                            self.source_name, message.status, worker.index)
            else:
                query.channel.forward(message.frame, message.terminal, message.status, message.error_code)
                if message.terminal and not query.replied:
                    query.replied = True
                    worker.replied += 1
            self.acks.accepted(worker, len(message.frame))
        elif kind is Done:
            worker.cache_counts = message.cache_counts
            self._finish(worker, message.qid,
                         Outcome(message.results_json, message.runtime, message.output, message.dry_run), None)
        elif kind is Failed:
            worker.cache_counts = message.cache_counts
            if not isinstance(message.error, QueryError):
                raise TypeError("failed without a QueryError")
            query = worker.inflight.get(message.qid)
            if message.refused and query is not None:    # the WITH clause was wrong: nothing ran
                query.known = None
            self._finish(worker, message.qid, None, message.error)
        elif kind is LinkFrame:
            self._link.send(message.frame)
            self.acks.accepted(worker, len(message.frame))
        elif kind is Cancelled:
            self._finish(worker, message.qid, None, None)
        elif kind is Declined:
            if message.qid in worker.inflight:
                self.requeue(worker, [message.qid])
        elif kind is ProcessesEnded:
            self.processes_ended += _processes_ended(self.source_name, worker, message)
        else:
            raise ValueError(f"unexpected message {kind.__name__}")

    def end_answered(self) -> None:
        """End the runs whose replies `handle` forwarded (Answered): once those replies were written."""
        answered = self._answered
        if not answered:
            return
        self._answered = []
        for worker, qid in answered:
            try:
                self._finish(worker, qid, _ANSWERED, None, dispatch=False)
            except Exception:   # noqa: BLE001 - a bug in one end must not cost the others theirs
                log.exception("source %s: ending query %d failed", self.source_name, qid)
        try:
            self.dispatcher.dispatch()      # once for the read's ends: what waits goes to the workers they freed
        except Exception:   # noqa: BLE001 - as for each end above: the worker's read is not at fault
            log.exception("source %s: giving waiting queries to workers failed", self.source_name)

    def _finish(self, worker: WorkerHandle, qid: int, outcome: Outcome | None, error: QueryError | None,
                dispatch: bool = True) -> None:
        query = worker.inflight.pop(qid, None)
        if query is not None and query.replied:
            worker.replied -= 1
        if worker.cancelling:
            worker.cancelling.discard(qid)
            if not worker.cancelling:
                self.pool.release(worker)
        if query is not None:
            if not query.ended:
                if error is None and outcome is None:
                    error = QueryError(errors.INTERNAL_ERROR, "The worker cancelled the query.")
                self._conclude(query, outcome, error)
            self.pool.query_ended(worker)
        if dispatch:
            self.dispatcher.dispatch()

    def requeue(self, worker: WorkerHandle, qids: list[int], counted: bool = True) -> None:
        for qid in reversed(qids):      # each goes first in line: their order is kept
            query = worker.inflight.pop(qid, None)
            if query is not None and not query.ended:
                self.requeued += counted
                self._wait_again(query)
        self.dispatcher.dispatch()

    def spill(self, worker: WorkerHandle) -> None:
        """The runs held for a worker that fell behind its pace (handle.PACE) go to whoever is free, first
        in line: it never saw them."""
        worker.over_pace = False
        qids = worker.channel.take_back_queued()
        if qids:
            self.spilled += len(qids)
            self.requeue(worker, qids, counted=False)

    def _wait_again(self, query: Query) -> None:
        ticket = self.dispatcher.wait_again(ENTRY_COST + query.size)
        ticket.add_done_callback(functools.partial(self._resend, query))

    def _resend(self, query: Query, ticket: asyncio.Future) -> None:
        """A query taken back gets its turn (its ticket: a worker reserved for it, or the busy error)."""
        error = asyncio.CancelledError() if ticket.cancelled() else ticket.exception()
        if error is not None:
            self._conclude(query, None, error)
            return
        worker = ticket.result()
        worker.reserved -= 1
        if query.ended:
            return
        if worker.alive:
            self.send(worker, query, flush=True)
        else:       # it ended meanwhile: first in line again
            self._wait_again(query)
            self.dispatcher.dispatch()


    def fail(self, worker: WorkerHandle, error: QueryError, requeue_unsent: bool = True) -> None:
        """It ended: the queries it held are answered with `error`, but for the runs held for it and never
        written (its turn was running): it never saw them, so they go to another worker, first in line."""
        unsent = worker.channel.take_back_queued() if requeue_unsent and not self.closed else []
        if unsent:
            log.info("source %s: %d queries held for worker %d, which ended before it was sent them, go to "
                     "another worker", self.source_name, len(unsent), worker.index)
            self.requeue(worker, unsent)
        lost = list(worker.inflight.values())
        worker.inflight.clear()
        for query in lost:
            self._conclude(query, None, error)
        worker.replied = 0
        self.acks.forget(worker)
        self.dispatcher.dispatch()

    def close(self, error: QueryError) -> None:
        """Every query held is answered with `error`; nothing more is watched."""
        self.closed = True
        self.deadlines.close()
        if self._checking is not None:
            self._checking.cancel()
            self._checking = None
        for query in list(self.running()):
            self._conclude(query, None, error)


_ANSWERED = Outcome(answered=True)


class Expired(Exception):
    """A query's timeout passed (set on its future by the deadline sweep)."""

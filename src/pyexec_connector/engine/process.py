"""Process engine: user code runs in a pool of long-lived worker processes, never on the connector's loop.

A thin façade over three parts (see docs/ENGINE.md for the picture):
- `WorkerPool` (pool.py) owns the processes: how many, start, watch, replace, stop;
- `Dispatcher` (dispatch.py) owns waiting: which worker takes a query, the queue, "busy";
- this module owns the queries themselves: their records, timeouts, and what workers say about them.

A query reaches a worker one of two ways, decided in `submit`: a plain query's frame goes as it came
(`Relay`, the worker reads its WITH clause: the connector reads no more of it than the frame's JSON),
and when no worker is free it waits in the Dispatcher's queue as that frame; anything else (a script, its
own timeout, cache control, a dry run, a name this engine does not know) is parsed here into a Job (`Run`).
Either way the worker's answer settles the query's future and Pipeline.finish ends it.

Each worker is a fresh interpreter (spawned: `python -m pyexec_connector.engine.worker`, never a fork of
the connector). A worker that dies fails only its own queries and is replaced; one that does not give
up a query after its timeout is killed. The pool belongs to one source: a runaway in one source cannot
starve another."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
from collections.abc import Iterator
from typing import Any, Protocol

from cachetools import LRUCache

from .. import errors, protocol, sandbox
from ..config import SourceConfig
from ..connection import Health
from ..errors import QueryError
from ..reply import ReplyChannel
from . import reaper, wire
from .base import Job, Outcome
from .dispatch import ENTRY_COST, Dispatcher, Waiting
from .messages import (
    ACCEPT_EVERY,
    ACKED,
    Accepted,
    Answered,
    Cancel,
    Cancelled,
    Configure,
    Done,
    Failed,
    HealthChanged,
    LinkFrame,
    ProcessesEnded,
    Relay,
    Reply,
    Run,
)
from .pipeline import Deadlines, Pipeline, timeout_error
from .pool import WorkerHandle, WorkerPool, WorkerState
from .recycle import RecyclePolicy
from .scaling import ScalePolicy

log = logging.getLogger(__name__)

KILL_GRACE = 2.0          # seconds a worker has to give up a timed-out query before it is killed
_COMPILE_ERRORS = frozenset({errors.SYNTAX_ERROR, errors.GUARD_VIOLATION})
# WITH parameters a relayed query may have; the others need the connector (see ProcessEngine._relay)
_RELAYED_PARAMETERS = frozenset({"code", "name", "presetValues", "codeHandlesReturn", "limitReturnTo",
                                 "captureOutput"})


class LinkOutlet(Protocol):
    """The part of the source's link the engine uses (SourceLink)."""

    def send(self, frame: str) -> None: ...
    async def drained(self) -> None: ...
    def is_drained(self) -> bool: ...
    def write_now(self) -> None: ...


class NameBook:
    """What each cached name's code is (as the connector last saw it run), so that a name-only query can
    run on any worker, also one that never saw the code."""

    def __init__(self, capacity: int, misses: int = 0):
        self._known: LRUCache[str, tuple[str, Any]] = LRUCache(maxsize=capacity)
        self.misses = misses        # name-only queries for a name nobody knew

    def __len__(self) -> int:
        return len(self._known)

    @property
    def capacity(self) -> int:
        return int(self._known.maxsize)

    def text(self, name: str) -> str | None:
        known = self._known.get(name)
        return known[0] if known is not None else None

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
        if known is None:
            self.misses += 1
            raise QueryError(errors.NO_CACHE, "No code is cached under the name {0}; send the code with it.",
                             [key])
        return Job(request, known[0], known[1], job.runtime_info, job.timeout, job.rich_results)

    def remember(self, known: tuple[str, str, Any] | None) -> None:
        if known is not None:
            name, text, fingerprint = known
            self._known[name] = (text, fingerprint)


@dataclasses.dataclass(eq=False, slots=True)
class _Query:
    qid: int
    channel: ReplyChannel
    future: asyncio.Future
    worker: WorkerHandle
    limit: float | None = None                  # its timeout, seconds
    deadline: float = 0.0                       # loop time its timeout passes (0.0: none); see Deadlines
    known: tuple[str, str, Any] | None = None   # (name, code text, fingerprint) for the name book once it ran
    message: bytes = b""                        # what its worker was sent (again to another, see requeue)


class ProcessEngine:
    """The process engine's façade: the query records (which worker has which query, their deadlines and
    futures), what each message from a worker does to them, and the link credit workers' sends wait for.
    The processes belong to WorkerPool, the waiting to Dispatcher, the end of a query to Pipeline.

    Longer than ~300 lines for a reason: every message kind a worker sends ends in a query record kept
    here, so their handling (take/_handle/_finish) stays beside the records; the relay and parsed paths
    share _register. The next split, if it grows: the Accepted credit accounting into a class of its own."""

    def __init__(self, config: SourceConfig, pipeline: Pipeline, link: LinkOutlet, health: Health, *,
                 source_name: str, server_config: dict[str, str], max_message_bytes: int | None = None,
                 worker_credentials: tuple[int, int] | None = None):
        self.source_name = source_name
        self._pipeline = pipeline
        self._link = link
        self._health = health
        self._server_config = dict(server_config)
        self._max_message_bytes = max_message_bytes
        self._credentials = worker_credentials      # (uid, gid) of workerUser, or None
        self._apply(config)
        self._names = NameBook(config.codeCacheSize)
        self._ids = itertools.count(1)
        self._closed = False
        self._deadlines = Deadlines(self._expire, self._running)
        self.timeouts = 0
        self._owed: dict[WorkerHandle, int] = {}     # link frames taken from each worker, not acknowledged yet
        self.accepted_frames = 0    # frames workers' code sent for the link (Reply, LinkFrame), taken into the outbox
        self.relayed = 0            # queries whose frame went to a worker as it came
        self.parsed = 0             # queries the connector parsed into a Job
        self.processes_ended = 0    # processes queries left running, ended by their workers (issue 21)
        health.listeners.append(self._health_changed)
        self.pool = WorkerPool(source_name, ScalePolicy.from_config(config), self, self._settings, max_message_bytes,
                               preload=config.preload, recycle=RecyclePolicy.from_config(config),
                               spawn_options=lambda: sandbox.worker_spawn_options(self._credentials))
        self.dispatcher = Dispatcher(self.pool, config.queriesPerWorker, config.maxQueuedQueries,
                                     config.maxQueuedBytes, self)

    # ---- configuration ----------------------------------------------------------------------
    def _apply(self, config: SourceConfig) -> None:
        self._config = config
        self._forbid = tuple(config.codeGuard.forbid) if config.codeGuard else ()

    def _settings(self) -> dict[str, Any]:
        """A new worker's Init."""
        return {"source_name": self.source_name, "server_config": self._server_config,
                "healthy": self._health.declared, "cache_capacity": self._config.codeCacheSize,
                "forbid": self._forbid, "memory_limit_mb": self._config.memoryLimitMB,
                "runtime_info": self._config.returnRuntimeInformation,
                "rich_results": self._config.resultValues == "rich",
                "max_message_bytes": self._max_message_bytes,
                "max_open_files": self._config.maxOpenFiles,
                "keep_child_processes": self._config.keepChildProcesses,
                # Linux counts RLIMIT_NPROC per user: only a user of the workers' own makes it theirs
                "max_processes": self._config.maxProcessesPerWorker if self._credentials else None}

    def reconfigure(self, config: SourceConfig) -> None:
        if config.pool_shape != self._config.pool_shape:
            raise ValueError("a new pool shape needs a new engine")
        self._apply(config)
        self._names = NameBook(config.codeCacheSize, self._names.misses)    # names are known afresh
        dispatcher = self.dispatcher
        dispatcher.per_worker, dispatcher.max_queued = config.queriesPerWorker, config.maxQueuedQueries
        dispatcher.max_queued_bytes = config.maxQueuedBytes
        self.pool.set_recycle_policy(RecyclePolicy.from_config(config))
        self.pool.set_scale_policy(ScalePolicy.from_config(config))
        self.pool.broadcast(Configure(config.codeCacheSize, self._forbid, config.returnRuntimeInformation,
                                       config.resultValues == "rich"))
        self.dispatcher.dispatch()

    def stats(self) -> dict[str, Any]:
        """For metrics and readiness. workers_alive counts processes alive or starting (not those waiting
        to retry after failed starts); can_run: whether the source can run code (a worker is up, or one can be
forked on demand: minWorkers 0). relayed/parsed: which way
        queries reached the workers (a debug figure)."""
        hits, misses = self.pool.retired_cache_counts
        return {"workers_alive": self.pool.alive_count(), "can_run": self.pool.can_run(),
                "worker_restarts": self.pool.restarts,
                "timeouts": self.timeouts, "queue_depth": self.dispatcher.depth,
                "queued_bytes": self.dispatcher.queued_bytes, "busy": self.dispatcher.busy,
                "busy_waited_timeout": self.dispatcher.expired_waiting,
                "cache_hits": hits + sum(w.cache_counts[0] for w in self.pool.workers),
                "cache_misses": self._names.misses + misses + sum(w.cache_counts[1] for w in self.pool.workers),
                "cache_size": len(self._names), "cache_capacity": self._names.capacity,
                "relayed": self.relayed, "parsed": self.parsed, "accepted_frames": self.accepted_frames,
                "timeouts_pending": self._deadlines.sweeping,
                "worker_recycles": dict(self.pool.recycles), "worker_forks": self.pool.launcher.forks,
                "worker_spawns": self.pool.launcher.spawns, "worker_idle_retired": self.pool.idle_retired,
                "worker_wedged": self.pool.supervisor.wedged, "queries_requeued": self.pool.supervisor.requeued,
                "query_processes_ended": self.processes_ended}

    # ---- one query --------------------------------------------------------------------------
    def submit(self, frame: protocol.QueryFrame, channel: ReplyChannel) -> None:
        try:
            query = self._relay(frame, channel)
        except Exception:   # noqa: BLE001 - a bug there must not cost the query its reply: it is parsed here
            log.exception("source %s: relaying query %s failed; running it the ordinary way",
                          self.source_name, frame.reply_address)
            query = None
        if query is None:
            self._parse(frame, channel)
        elif isinstance(query, _Query):
            self._relayed(query)

    def _parse(self, frame: protocol.QueryFrame, channel: ReplyChannel) -> None:
        self.parsed += 1
        self._pipeline.track(asyncio.ensure_future(self._pipeline.answer(frame, channel, self.run)))

    def _relayed(self, query: _Query) -> None:
        self.relayed += 1
        self._pipeline.in_flight.add(query.future)
        query.future.add_done_callback(functools.partial(self._settled, query))

    def _settled(self, query: _Query, future: asyncio.Future) -> None:
        self._pipeline.in_flight.discard(future)
        self._pipeline.settle(query.channel, self.settle, query)

    def _running(self) -> Iterator[_Query]:
        for worker in self.pool.workers:
            yield from worker.inflight.values()

    def _relay(self, frame: protocol.QueryFrame, channel: ReplyChannel) -> _Query | object | None:
        """The frame to a free worker as it came, for a plain query (code and/or a known name, presets, the
        return options), or to the queue as it came when no worker is free (_QUEUED; a busy query is
        answered here); None for anything else."""
        params = frame.params
        if self._closed or frame.raw is None or type(params) is not dict \
                or not params.keys() <= _RELAYED_PARAMETERS or not self.pool.started.is_set():
            return None
        code, name = params.get("code"), params.get("name")
        if name is not None and (type(name) is not str or not name or "\x00" in name):
            return None
        if code is None:
            if name is None or self._names.text(name) is None:
                return None
        elif type(code) is not str:
            return None
        worker = self.dispatcher.free_worker()
        if worker is None:
            # waits as the frame it is: no Job, no task (queueing by cost, see dispatch.py)
            try:
                self.dispatcher.wait(frame, channel, len(frame.raw) + ENTRY_COST, self._config.executionTimeout)
            except QueryError as exc:
                self._pipeline.finish(channel, error=exc)
            return _QUEUED
        return self._send_relay(worker, frame, channel)

    def _send_relay(self, worker: WorkerHandle, frame: protocol.QueryFrame, channel: ReplyChannel) -> _Query | None:
        params = frame.params
        code, name = params.get("code"), params.get("name")
        text = None
        if code is None:
            text = self._names.text(name)
            if text is None:        # forgotten while it waited: the parsed way answers it
                return None
        qid = next(self._ids)
        assert frame.raw is not None
        return self._register(worker, qid, channel, self._config.executionTimeout,
                              (name, code, code) if name is not None and code is not None else None,
                              wire.encode(Relay(qid, frame.reply_address, text, frame.raw)))

    # ---- queued frames (dispatch.Starter) ---------------------------------------------------------
    def start_waiting(self, waiting: Waiting, worker: WorkerHandle) -> None:
        if waiting.query is not None:       # taken back from a worker that never read it
            query, waiting.query = waiting.query, None
            if not query.future.done():
                query.worker = worker
                worker.inflight[query.qid] = query
                worker.send_run(query.message, query.qid)
            return
        frame, channel = waiting.frame, waiting.channel
        try:
            query = self._send_relay(worker, frame, channel) if not self._closed else None
        except Exception:   # noqa: BLE001 - as in submit: the query is parsed instead
            log.exception("source %s: relaying query %s failed; running it the ordinary way",
                          self.source_name, frame.reply_address)
            query = None
        if query is None:
            self._parse(frame, channel)
        else:
            self._relayed(query)

    def refuse_waiting(self, waiting: Waiting, error: QueryError) -> None:
        if waiting.query is not None:
            if not waiting.query.future.done():
                waiting.query.future.set_exception(error)
            return
        self._pipeline.finish(waiting.channel, error=error)

    async def run(self, job: Job, channel: ReplyChannel) -> Outcome:
        """A query the connector parsed: to a worker (waiting for one if need be), then its outcome."""
        await self.pool.started.wait()
        if self._closed:
            raise _shutting_down()
        job = self._names.with_source(job)
        # a parsed query waits as its task and Job: charged its code's size (the most of either)
        worker = await self.dispatcher.acquire(ENTRY_COST + len(job.source_text or ""), job.timeout)
        request = job.request
        known = (request.cache_key, job.source_text, job.fingerprint) \
            if request.cache_key is not None and request.cache_code and not request.dry_run \
            and job.source_text is not None else None
        qid = next(self._ids)
        query = self._register(worker, qid, channel, job.timeout, known,
                               wire.encode(Run(qid, job, channel.reply_address)))
        try:
            await query.future
        except asyncio.CancelledError:
            if not query.future.cancelled():    # cancelled after the query ended: nothing to stop
                raise
            # else the future was cancelled with this task: settle() stops the query and raises
        except BaseException:   # noqa: BLE001, S110 - settle() raises it again
            pass
        return self.settle(query)

    def _register(self, worker: WorkerHandle, qid: int, channel: ReplyChannel, limit: float | None,
                  known: tuple[str, str, Any] | None, message: bytes) -> _Query:
        """The query becomes the worker's (its death or close() answers it) and its message goes out."""
        loop = asyncio.get_running_loop()
        query = _Query(qid, channel, loop.create_future(), worker, limit, 0.0, known, message)
        worker.inflight[qid] = query
        worker.send_run(message, qid)
        if limit:
            self._deadlines.watch(query, limit, loop)
        return query

    def settle(self, query: _Query) -> Outcome:
        """The end of a query whose future is done: its Outcome, or the QueryError to answer with (a
        timeout, a worker's death, the code's error). Raises CancelledError for a query the caller
        stopped waiting for (the worker is told to stop it)."""
        future = query.future
        if future.cancelled():
            self._abandon(query, "the connector stopped waiting for it")
            raise asyncio.CancelledError
        error = future.exception()
        if error is None:
            if query.known is not None:
                self._names.remember(query.known)
            return future.result()
        if isinstance(error, _Expired):
            self.timeouts += 1
            self._abandon(query, f"its timeout of {query.limit:g} s passed")
            raise timeout_error(query.limit)
        if isinstance(error, QueryError) and error.code not in _COMPILE_ERRORS:
            self._names.remember(query.known)
        raise error

    def _expire(self, query: _Query) -> None:
        if not query.future.done():
            query.future.set_exception(_Expired())   # its waiter answers, and stops the run

    def _abandon(self, query: _Query, why: str) -> None:
        """Stop a query nobody waits for; kill its worker if it does not let go in time. Until it does,
        the worker takes nothing new (it may be stuck in synchronous code)."""
        worker = query.worker
        if not worker.alive or query.qid not in worker.inflight:
            return
        worker.send(Cancel(query.qid))
        worker.cancelling.add(query.qid)
        if worker.state is WorkerState.READY:
            worker.state = WorkerState.DRAINING
        reason = f"it did not stop the query {query.channel.reply_address} within {KILL_GRACE:g} s after {why}"

        def kill_if_stuck() -> None:
            if worker.alive and query.qid in worker.inflight:
                log.warning("source %s: killing worker %d: %s", self.source_name, worker.index, reason)
                worker.kill(f"the connector stopped it: {reason}")

        asyncio.get_running_loop().call_later(KILL_GRACE, kill_if_stuck)

    # ---- what workers say (PoolEvents) ----------------------------------------------------------
    def take(self, worker: WorkerHandle, message: Any) -> bool:
        """Every message from a worker, as it arrives or from the pool's reading task: handled now unless
        it must wait (a health change is awaited before the code's next reply goes out; nothing is taken
        from workers while the link is backed up)."""
        if message is ACKED:
            return True
        if type(message) is HealthChanged or not self._link.is_drained():
            return False
        self._handle(worker, message)
        return True

    async def take_later(self, worker: WorkerHandle, message: Any) -> None:
        if type(message) is HealthChanged:
            try:
                await self._health.declare(bool(message.healthy))
            except Exception:   # noqa: BLE001 - a failing health listener is not the worker's fault
                log.exception("source %s: declaring health failed", self.source_name)
            return
        await self._link.drained()
        self._handle(worker, message)
        await self._link.drained()     # the link is slow: stop reading, and the worker's writes wait

    def taken(self) -> None:
        self._link.write_now()         # a worker's answers go out in the step they came in

    def _handle(self, worker: WorkerHandle, message: Any) -> None:
        kind = type(message)
        if kind is Answered:
            # The worker built the whole 200 reply: it goes out as it came, before the run ends (the
            # completion then has nothing to build). Kept for speed: see docs/PERFORMANCE.md.
            qid, frame, worker.cache_counts = message
            query = worker.inflight.get(qid)
            if query is not None and not query.future.done():
                query.channel.forward(frame, True, protocol.STATUS_COMPLETE)
            self._finish(worker, qid, _ANSWERED, None)
        elif kind is Reply:
            query = worker.inflight.get(message.qid)
            if query is None:
                log.warning("source %s: reply %s from worker %d for a finished query dropped",
                            self.source_name, message.status, worker.index)
            else:
                query.channel.forward(message.frame, message.terminal, message.status, message.error_code)
            self._accepted(worker, len(message.frame))
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
            self._accepted(worker, len(message.frame))
        elif kind is Cancelled:
            self._finish(worker, message.qid, None, None)
        elif kind is ProcessesEnded:
            self._processes_ended(worker, message)
        else:
            raise ValueError(f"unexpected message {kind.__name__}")

    def _processes_ended(self, worker: WorkerHandle, message: ProcessesEnded) -> None:
        count = message.processes
        if type(count) is not int or count < 0 or type(message.reply_address) is not str:
            raise ValueError("a ProcessesEnded without a count")
        self.processes_ended += count
        log.info("source %s: query %s ended with %d process%s it started still running (worker %d): sent "
                 "SIGTERM, SIGKILL after %g s (keepChildProcesses: false)", self.source_name,
                 message.reply_address[:200], count, "" if count == 1 else "es", worker.index, reaper.GRACE)

    def _accepted(self, worker: WorkerHandle, size: int) -> None:
        """A frame from the worker's code went into the outbox (handled only while it has room): told to the
        worker, whose awaited sends wait once it is ACCEPT_WINDOW ahead, every ACCEPT_EVERY characters."""
        self.accepted_frames += 1
        owed = self._owed.get(worker, 0) + size
        if owed >= ACCEPT_EVERY:
            self._owed[worker] = 0
            worker.send(Accepted(owed))
        else:
            self._owed[worker] = owed

    def _finish(self, worker: WorkerHandle, qid: int, outcome: Outcome | None, error: QueryError | None) -> None:
        query = worker.inflight.pop(qid, None)
        if worker.cancelling:
            worker.cancelling.discard(qid)
            if not worker.cancelling and worker.state is WorkerState.DRAINING:
                worker.state = WorkerState.READY
        if query is not None:
            if not query.future.done():
                if error is not None:
                    query.future.set_exception(error)
                elif outcome is not None:
                    query.future.set_result(outcome)
                else:
                    query.future.set_exception(QueryError(errors.INTERNAL_ERROR, "The worker cancelled the query."))
            self.pool.query_ended(worker)
        self.dispatcher.dispatch()

    def worker_ready(self, worker: WorkerHandle) -> None:
        self.dispatcher.dispatch()

    def worker_ended(self, worker: WorkerHandle, what: str) -> None:
        error = QueryError(errors.WORKER_DIED, "The worker process running the code ended: {0}.", [what]) \
            if not self._closed else _shutting_down()
        for query in worker.inflight.values():
            if not query.future.done():
                query.future.set_exception(error)
        worker.inflight.clear()
        self._owed.pop(worker, None)
        self.dispatcher.dispatch()

    def no_worker_starts(self, why: str) -> None:
        self.dispatcher.fail_waiting(QueryError(errors.WORKER_DIED, "No worker process is available: {0}.", [why]))

    def reading(self) -> bool:
        return self._link.is_drained()

    def requeue(self, worker: WorkerHandle, qids: list[int]) -> None:
        for qid in reversed(qids):      # each goes first in line: their order is kept
            query = worker.inflight.pop(qid, None)
            if query is not None and not query.future.done():
                self.dispatcher.wait_again(query, ENTRY_COST + len(query.message))
        self.dispatcher.dispatch()

    async def _health_changed(self, healthy: bool) -> None:
        self.pool.broadcast(HealthChanged(healthy))

    # ---- lifecycle --------------------------------------------------------------------------
    async def close(self) -> None:
        """Answer everything still waiting or running (shutting down), then stop the workers."""
        if self._closed:
            return
        self._closed = True
        self._deadlines.close()
        if self._health_changed in self._health.listeners:
            self._health.listeners.remove(self._health_changed)
        self.dispatcher.fail_waiting(_shutting_down())
        self.dispatcher.close()
        for worker in self.pool.workers:
            for query in worker.inflight.values():
                if not query.future.done():
                    query.future.set_exception(_shutting_down())
        await self.pool.stop()

    async def retire(self) -> None:
        """After a reconfigure changed the pool: let the queries already here finish, then close."""
        while any(w.inflight or w.reserved for w in self.pool.workers) or self.dispatcher.depth:
            await asyncio.sleep(0.05)
        await self.close()


_ANSWERED = Outcome(answered=True)
_QUEUED = object()      # _relay: the frame waits in the dispatcher's queue (or was answered busy)


class _Expired(Exception):
    """A query's timeout passed (set on its future by the deadline sweep)."""


def _shutting_down() -> QueryError:
    return QueryError(errors.SHUTTING_DOWN, "The connector stopped the source's workers before the query "
                                            "finished; send the query again.")


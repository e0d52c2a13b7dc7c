"""Process engine: user code runs in a pool of long-lived worker processes, never on the connector's loop.

The way in (see docs/ENGINE.md for the picture and who owns what):
- `WorkerPool` (pool.py) owns the processes: start, the supervision tick, replace, stop;
- `Dispatcher` (dispatch.py) owns choosing a worker and the one queue per source, "busy";
- `QueryBook` (queries.py) owns the query records and what workers say about them;
- this module decides how a query reaches a worker, configures the pool and reports its figures.

A query reaches a worker one of two ways, decided in `submit`: a plain query's frame goes as it came
(`Relay`, the worker reads its WITH clause: the connector reads no more of it than the frame's JSON),
and when no worker asked for work it waits in the Dispatcher's queue as that frame; anything else (a
script, its own timeout, cache control, a dry run, a name this engine does not know) is parsed into a Job
(`Run`). Either way it becomes one Query record, and Pipeline.finish ends it.

Workers pull: each asks for runs when its loop has nothing ready (messages.Credit), and a run it does not
read in time goes to another worker. A worker that dies fails only its own queries and is replaced; one
that does not give up a query after its timeout is killed. The pool belongs to one source: a runaway in
one source cannot starve another."""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from typing import Any

from .. import errors, protocol, sandbox
from ..config import SourceConfig
from ..connection import Health
from ..errors import QueryError
from ..reply import ReplyChannel
from .base import Job, Outcome
from .dispatch import ENTRY_COST, Dispatcher
from .intake import Intake
from .messages import (
    Configure,
    HealthChanged,
    Relay,
    Run,
)
from .pipeline import Pipeline, time_limit
from .pool import NoWorkerStarts, WorkerEnded, WorkerHandle, WorkerPool, WorkerReady, credit_figures
from .queries import LinkOutlet, NameBook, Query, QueryBook
from .recycle import RecyclePolicy
from .scaling import ScalePolicy
from .stats import EngineStats

log = logging.getLogger(__name__)

# WITH parameters a relayed query may have; the others need the connector (see ProcessEngine._relay)
_RELAYED_PARAMETERS = frozenset({"code", "name", "presetValues", "codeHandlesReturn", "limitReturnTo",
                                 "captureOutput"})


class ProcessEngine:
    """The way into the process engine (the Engine protocol): a query's way to a worker (as its frame, or
    parsed), the source's configuration of the pool, its figures, and its end. The query records are
    QueryBook's (queries.py), the processes WorkerPool's, the waiting Dispatcher's."""

    def __init__(self, config: SourceConfig, pipeline: Pipeline, link: LinkOutlet, health: Health, *,
                 source_name: str, server_config: dict[str, str], max_message_bytes: int | None = None,
                 worker_credentials: tuple[int, int] | None = None, python: str | None = None):
        self.source_name = source_name
        self._pipeline = pipeline
        self._link = link
        self._health = health
        self._server_config = dict(server_config)
        self._max_message_bytes = max_message_bytes
        self._credentials = worker_credentials      # (uid, gid) of workerUser, or None
        self._apply(config)
        self._ids = itertools.count(1)
        self._closed = False
        self.relayed = 0            # queries whose frame went to a worker as it came
        self.parsed = 0             # queries the connector parsed into a Job
        self._before_start = 0      # parsed queries waiting for the pool's first workers
        health.listeners.append(self._health_changed)
        self.pool = WorkerPool(source_name, ScalePolicy.from_config(config), self._settings, max_message_bytes,
                               preload=config.preload, recycle=RecyclePolicy.from_config(config),
                               spawn_options=lambda: sandbox.worker_spawn_options(self._credentials), python=python)
        self.dispatcher = Dispatcher(self.pool, config.queriesPerWorker, config.maxQueuedQueries,
                                     config.maxQueuedBytes)
        self.queries = QueryBook(source_name, self.pool, self.dispatcher, link, NameBook(config.codeCacheSize),
                                 pipeline)
        self.intake = Intake(source_name, self.queries, link, health)
        self._following = asyncio.ensure_future(self._follow())

    # ---- configuration ----------------------------------------------------------------------
    def _apply(self, config: SourceConfig) -> None:
        self._config = config
        self._relay_limit = time_limit(None, config)     # a relayed query's timeout (no WITH timeout)
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
                "queries_per_worker": self._config.queriesPerWorker,
                "keep_child_processes": self._config.keepChildProcesses,
                # Linux counts RLIMIT_NPROC per user: only a user of the workers' own makes it theirs
                "max_processes": self._config.maxProcessesPerWorker if self._credentials else None}

    def reconfigure(self, config: SourceConfig) -> None:
        if config.pool_shape != self._config.pool_shape:
            raise ValueError("a new pool shape needs a new engine")
        self._apply(config)
        self.queries.names = NameBook(config.codeCacheSize, self.queries.names.misses)    # known afresh
        dispatcher = self.dispatcher
        dispatcher.per_worker, dispatcher.max_queued = config.queriesPerWorker, config.maxQueuedQueries
        dispatcher.max_queued_bytes = config.maxQueuedBytes
        self.pool.set_recycle_policy(RecyclePolicy.from_config(config))
        self.pool.set_scale_policy(ScalePolicy.from_config(config))
        self.pool.broadcast(Configure(config.codeCacheSize, self._forbid, config.returnRuntimeInformation,
                                       config.resultValues == "rich", config.queriesPerWorker))
        self.dispatcher.dispatch()

    def stats(self) -> EngineStats:
        """workers_alive counts processes alive or starting (not those waiting to retry after failed
        starts); can_run: a worker is up, or one can be forked on demand (minWorkers 0)."""
        hits, misses = self.pool.retired_cache_counts
        book, names = self.queries, self.queries.names
        return EngineStats(
            can_run=self.pool.can_run(), workers_alive=self.pool.alive_count(), worker_restarts=self.pool.restarts,
            timeouts=book.timeouts, queue_depth=self.dispatcher.depth, queued_bytes=self.dispatcher.queued_bytes,
            busy=self.dispatcher.busy, busy_waited_timeout=self.dispatcher.expired_waiting,
            cache_hits=hits + sum(w.cache_counts[0] for w in self.pool.workers),
            cache_misses=names.misses + misses + sum(w.cache_counts[1] for w in self.pool.workers),
            cache_size=len(names), cache_capacity=names.capacity,
            worker_recycles=dict(self.pool.recycles), worker_forks=self.pool.launcher.forks,
            worker_spawns=self.pool.launcher.spawns, worker_idle_retired=self.pool.idle_retired,
            worker_wedged=self.pool.wedged, queries_requeued=book.requeued, queries_spilled=book.spilled,
            relayed=self.relayed, parsed=self.parsed, accepted_frames=book.acks.frames,
            timeouts_pending=book.deadlines.sweeping, query_processes_ended=book.processes_ended,
            **credit_figures(self.pool.credit_ledger()))

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
        elif isinstance(query, Query):
            self.relayed += 1      # the QueryBook ends it (Pipeline.finish): no future, no task

    def _parse(self, frame: protocol.QueryFrame, channel: ReplyChannel) -> None:
        self.parsed += 1
        self._pipeline.track(asyncio.ensure_future(self._answer(frame, channel)))

    def _relayed(self, query: Query) -> None:
        self.relayed += 1      # the QueryBook ends it (Pipeline.finish): no future, no task

    def _relay(self, frame: protocol.QueryFrame, channel: ReplyChannel) -> Query | object | None:
        """The frame to a free worker as it came, for a plain query (code and/or a known name, presets, the
        return options), or to the queue as it came when no worker is free (_QUEUED; a busy query is
        answered here); None for anything else."""
        params = frame.params
        if self._closed or frame.raw is None or type(params) is not dict or not params.keys() <= _RELAYED_PARAMETERS:
            return None
        code, name = params.get("code"), params.get("name")
        if name is not None and (type(name) is not str or not name or "\x00" in name):
            return None
        names = self.queries.names
        if code is None:
            if name is None or names.text(name) is None:
                return None
        elif type(code) is not str:
            return None
        worker = self.dispatcher.free_worker(names.holder(name))
        if worker is not None:      # (a ready worker: the pool has started)
            return self._send_relay(worker, frame, channel, code, name)
        if not self.pool.started.is_set():
            return None
        # waits as the frame it is: no Job, no task (queueing by cost, see dispatch.py)
        try:
            ticket = self.dispatcher.wait(len(frame.raw) + ENTRY_COST, self._config.executionTimeout)
        except QueryError as exc:
            self._pipeline.finish(channel, error=exc)
        else:
            ticket.add_done_callback(functools.partial(self._waited, frame, channel))
        return _QUEUED

    def _send_relay(self, worker: WorkerHandle, frame: protocol.QueryFrame, channel: ReplyChannel, code: Any,
                    name: Any) -> Query | None:
        text = None
        names = self.queries.names
        if code is None:
            text = names.text(name)
            if text is None:        # forgotten while it waited: the parsed way answers it
                return None
        qid = next(self._ids)
        raw = frame.raw
        assert raw is not None
        names.held_by(name, worker)
        return self.queries.register(worker, qid, channel, self._relay_limit,
                                     (name, code, code) if name is not None and code is not None else None,
                                     _new(Relay, (qid, frame.reply_address, text, raw, 0.0)),
                                     len(raw) + len(text or ""))

    # ---- queued frames ------------------------------------------------------------------------
    def _waited(self, frame: protocol.QueryFrame, channel: ReplyChannel, ticket: asyncio.Future) -> None:
        """A queued frame's turn: its ticket (dispatch.Waiting) came back with a worker reserved for it, or
        with the busy error."""
        error = asyncio.CancelledError() if ticket.cancelled() else ticket.exception()
        if error is not None:
            self._pipeline.fail(channel, error)
            return
        worker = ticket.result()
        worker.reserved -= 1
        try:
            params = frame.params
            query = self._send_relay(worker, frame, channel, params.get("code"), params.get("name")) \
                if not self._closed and worker.alive else None
        except Exception:   # noqa: BLE001 - as in submit: the query is parsed instead
            log.exception("source %s: relaying query %s failed; running it the ordinary way",
                          self.source_name, frame.reply_address)
            query = None
        if query is None:       # the worker ended meanwhile, the name was forgotten, or closing
            self._parse(frame, channel)
        else:
            self._relayed(query)

    async def _answer(self, frame: protocol.QueryFrame, channel: ReplyChannel) -> None:
        job = await self._pipeline.prepare(frame, channel)
        if job is not None:
            await self._pipeline.complete(channel, self.run(job, channel))

    async def run(self, job: Job, channel: ReplyChannel) -> Outcome:
        """A query the connector parsed: to a worker (waiting for one if need be), then its outcome."""
        if not self.pool.started.is_set():
            self._before_start += 1         # retire() waits for these too
            try:
                await self.pool.started.wait()
            finally:
                self._before_start -= 1
        if self._closed:
            raise _shutting_down()
        job = self.queries.names.with_source(job)
        # a parsed query waits as its task and Job: charged its code's size (the most of either)
        request = job.request
        worker = await self.dispatcher.acquire(ENTRY_COST + len(job.source_text or ""), job.timeout,
                                               self.queries.names.holder(request.cache_key))
        known = (request.cache_key, job.source_text, job.fingerprint) \
            if request.cache_key is not None and request.cache_code and not request.dry_run \
            and job.source_text is not None else None
        qid = next(self._ids)
        query = self.queries.register(worker, qid, channel, job.timeout, known, Run(qid, job, channel.reply_address),
                                      ENTRY_COST + len(job.source_text or ""), awaited=True)
        self.queries.names.held_by(request.cache_key, worker)
        assert query.future is not None
        try:
            await query.future
        except asyncio.CancelledError:
            if not query.future.cancelled():    # cancelled after the query ended: nothing to stop
                raise
            # else the future was cancelled with this task: settle() stops the query and raises
        except BaseException:   # noqa: BLE001, S110 - settle() raises it again
            pass
        return self.queries.settle(query)

    # ---- what happens to workers (the pool's events) --------------------------------------------
    async def _follow(self) -> None:
        """The pool's events, in order, for the engine's life: a ready worker's messages go to the intake
        and waiting queries to it; an ended worker's queries fail."""
        async for event in self.pool.events.follow():
            try:
                if type(event) is WorkerReady:
                    event.worker.serve(self.intake.take)
                    self.dispatcher.dispatch()
                elif type(event) is WorkerEnded:
                    error = QueryError(errors.WORKER_DIED, "The worker process running the code ended: {0}.",
                                       [event.what]) if not self._closed else _shutting_down()
                    self.queries.fail(event.worker, error, requeue_unsent=not self._closed)
                elif type(event) is NoWorkerStarts:
                    self.dispatcher.fail_waiting(QueryError(errors.WORKER_DIED, "No worker process is available: "
                                                                                "{0}.", [event.why]))
            except Exception:   # noqa: BLE001 - the events after it must still be followed
                log.exception("source %s: handling %s failed", self.source_name, type(event).__name__)

    async def _health_changed(self, healthy: bool) -> None:
        self.pool.broadcast(HealthChanged(healthy))

    # ---- lifecycle --------------------------------------------------------------------------
    async def close(self) -> None:
        """Answer everything still waiting or running (shutting down), then stop the workers."""
        if self._closed:
            return
        self._closed = True
        if self._health_changed in self._health.listeners:
            self._health.listeners.remove(self._health_changed)
        self.dispatcher.fail_waiting(_shutting_down())
        self.dispatcher.close()
        self.queries.close(_shutting_down())
        await self.pool.stop()
        self._following.cancel()
        await asyncio.gather(self._following, return_exceptions=True)

    async def retire(self) -> None:
        """After a reconfigure changed the pool: let the queries already here finish, then close."""
        while any(w.inflight or w.reserved for w in self.pool.workers) or self.dispatcher.depth \
                or self._before_start:
            await asyncio.sleep(0.05)
        await self.close()


_new = tuple.__new__      # a NamedTuple without its Python-level __new__ (one per run sent)
_QUEUED = object()      # _relay: the frame waits in the dispatcher's queue (or was answered busy)


def _shutting_down() -> QueryError:
    return QueryError(errors.SHUTTING_DOWN, "The connector stopped the source's workers before the query "
                                            "finished; send the query again.")


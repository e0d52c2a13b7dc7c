"""Process engine: user code runs in a pool of long-lived worker processes, never on the connector's loop.

Each worker is a fresh interpreter (spawned: a new `python -m pyexec_connector.engine.worker`, never a
fork of the connector) with its own asyncio loop and code cache. A query goes to the least-busy worker;
when every worker has `queriesPerWorker` queries, it waits in a queue of at most `maxQueuedQueries`,
and beyond that it is answered "busy" at once. A worker that dies (exit, signal, out of memory) fails
only its own queries and is replaced; one that does not give up a query after its timeout is killed.

The pool belongs to one source: each source has its own configuration (workers, memory limit, guard),
its own link and its own health, and a runaway in one source cannot starve another."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from cachetools import LRUCache

from .. import errors, protocol
from ..config import TOKEN_ENV, SourceConfig
from ..connection import Health
from ..errors import QueryError
from ..reply import ReplyChannel
from . import wire
from .base import Job, Outcome
from .inline import timeout_error

log = logging.getLogger(__name__)

KILL_GRACE = 2.0          # seconds a worker has to give up a timed-out query before it is killed
START_TIMEOUT = 60.0      # seconds a new worker has to say it is ready
STOP_GRACE = 2.0          # seconds workers have to exit at close before they are killed
SWEEP_INTERVAL = 0.05     # seconds between checks of running queries' timeouts
HOLD_MAX = 0.02           # seconds a query is held for a worker that has not written back (_Worker.send_run)
RESTART_DELAY_MAX = 30.0
_COMPILE_ERRORS = frozenset({errors.SYNTAX_ERROR, errors.GUARD_VIOLATION})


@dataclasses.dataclass(eq=False, slots=True)
class _Query:
    qid: int
    channel: ReplyChannel
    future: asyncio.Future
    worker: _Worker | None = None
    deadline: float = 0.0                     # loop time its timeout passes (0: none); see _sweep()
    limit: float | None = None                # its timeout, seconds
    known: tuple[str, str, Any] | None = None   # (name, code text, fingerprint) for _known once it ran


class _Worker:
    """The connector's handle on one worker process."""

    def __init__(self, index: int):
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None
        self.ready = False              # takes queries now
        self.became_ready = False       # ever said it was ready (else a death is a failed start)
        self.alive = True
        self.inflight: dict[int, _Query] = {}
        self.reserved = 0               # slots promised to queued queries that have not resumed yet
        self.kill_reason: str | None = None
        self.reader_task: asyncio.Task | None = None
        self.restarts = 0               # deaths in a row before becoming ready (for the restart backoff)
        self.cancelling: set[int] = set()   # queries told to stop: no new work until it lets go of them
        self.cache_counts = (0, 0)      # its code cache's hits and misses, as it last reported them
        self.backing_off = False        # waiting to start again after failed starts
        self._held: list[bytes] = []    # messages not written yet: see send_run()
        self.awaiting = False           # written to, and not heard from since
        self._release: asyncio.TimerHandle | None = None
        self.broken = False             # sent a message the connector could not handle

    @property
    def load(self) -> int:
        return len(self.inflight) + self.reserved

    def send(self, message: Any) -> None:
        """Write the message now (after any held ones: order is kept)."""
        self._held.append(wire.pack(message))
        self.flush()

    def send_run(self, data: bytes) -> None:
        """A query: written now to a worker that has answered everything written to it, else held until it
        writes back (wire.ACK at the latest, see heard()). Under load a worker then takes the queries that
        came meanwhile in one read, and answers them in one write, instead of one wake-up of each process
        per query; an idle worker gets its query at once."""
        self._held.append(data)
        if not self.awaiting:
            self.flush()
        elif len(self._held) == 1:      # a guard: a worker stuck in code gets them anyway, to read later
            self._release = asyncio.get_running_loop().call_later(HOLD_MAX, self.flush)

    def heard(self) -> None:
        """The worker wrote something: it reads again. What was held goes now, in one write."""
        self.awaiting = False
        if self._held:
            self.flush()

    def flush(self) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None
        if not self._held:
            return
        data = b"".join(self._held) if len(self._held) > 1 else self._held[0]
        self._held.clear()
        if self.writer is None or self.writer.is_closing():
            return
        self.awaiting = True
        try:
            self.writer.write(data)
        except (ConnectionError, RuntimeError):
            pass    # it is dying; its watcher fails its queries

    def kill(self, reason: str) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.kill_reason = self.kill_reason or reason
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


def describe_exit(returncode: int | None, killed_by_us: bool = False) -> str:
    if returncode is None:
        return "unknown exit"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        hint = " (likely the out-of-memory killer)" if -returncode == signal.SIGKILL and not killed_by_us else ""
        return f"killed by signal {name} ({-returncode}){hint}"
    return f"exit code {returncode}"


class ProcessEngine:
    def __init__(self, config: SourceConfig, *, source_name: str, send: Callable[[str], None],
                 drained: Callable[[], Awaitable[None]], health: Health, server_config: dict[str, str],
                 max_message_bytes: int | None = None, is_drained: Callable[[], bool] | None = None,
                 write_link: Callable[[], None] | None = None):
        self.source_name = source_name
        self._max_message_bytes = max_message_bytes
        self._send_link = send
        self._drained = drained
        self._is_drained = is_drained    # whether `drained` would return at once
        self._write_link = write_link    # writes what `send` queued, in this step (SourceLink.write_now)
        self._health = health
        self._server_config = dict(server_config)
        self._shape = config.pool_shape
        self._apply(config)
        self._workers: list[_Worker] = []
        self._waiting: deque[asyncio.Future] = deque()
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._sweeping: asyncio.TimerHandle | None = None
        self._closing = asyncio.Event()
        self._starting: set[asyncio.Task] = set()   # spawns under way: close() waits for them, never cancels
        self._started = asyncio.Event()
        self.worker_restarts = 0
        self.timeouts = 0
        self._cache_hits = 0            # of workers gone, and names the connector knew nothing of
        self._cache_misses = 0
        health.listeners.append(self._health_changed)
        for index in range(config.worker_count):
            self._workers.append(_Worker(index))
        self._spawn_task(self._start_all(), "start")

    # ---- configuration ----------------------------------------------------------------------
    def _apply(self, config: SourceConfig) -> None:
        self._config = config
        self._per_worker = config.queriesPerWorker
        self._max_queued = config.maxQueuedQueries
        self._forbid = tuple(config.codeGuard.forbid) if config.codeGuard else ()
        # what each cached name was compiled from, so that a name-only query can run on any worker
        self._known: LRUCache[str, tuple[str, Any]] = LRUCache(maxsize=config.codeCacheSize)

    def reconfigure(self, config: SourceConfig) -> None:
        if config.pool_shape != self._shape:
            raise ValueError("a new pool shape needs a new engine")
        self._apply(config)
        for worker in self._workers:
            worker.send(("configure", config.codeCacheSize, self._forbid, config.returnRuntimeInformation,
                         config.resultValues == "rich"))
        self._dispatch_waiting()

    def stats(self) -> dict[str, Any]:
        """For metrics and readiness. workers_alive counts processes alive or starting (not those waiting
        to retry after failed starts): 0 means this source cannot run code."""
        return {"workers_alive": sum(1 for w in self._workers if w.alive and not w.backing_off),
                "worker_restarts": self.worker_restarts, "timeouts": self.timeouts,
                "queue_depth": len(self._waiting),
                "cache_hits": self._cache_hits + sum(w.cache_counts[0] for w in self._workers),
                "cache_misses": self._cache_misses + sum(w.cache_counts[1] for w in self._workers),
                "cache_size": len(self._known), "cache_capacity": int(self._known.maxsize)}

    # ---- one query --------------------------------------------------------------------------
    async def run(self, job: Job, channel: ReplyChannel) -> Outcome:
        await self._started.wait()
        if self._closed:
            raise _shutting_down()
        job = self._with_source(job)
        query = self._send(await self._acquire(), job, channel)
        try:
            await query.future
        except asyncio.CancelledError:
            if not query.future.cancelled():    # cancelled after the query ended: nothing to stop
                raise
            # else the future was cancelled with this task: settle() stops the query and raises
        except BaseException:   # noqa: BLE001, S110 - settle() raises it again
            pass
        return self.settle(query)

    def relay(self, frame: protocol.QueryFrame, channel: ReplyChannel) -> _Query | None:
        """The fast path of most queries: the frame goes to a free worker as it came, which reads the
        WITH clause and runs the code; the connector reads no more of it than the frame's JSON. Only for
        plain queries (code and/or a known name, presets, the return options): anything with a script,
        its own timeout, cache control or a dry run, or a name this engine does not know, and any query
        that would wait for a worker returns None and goes through run(). The caller waits for the
        query's future, then calls settle()."""
        params = frame.params
        if self._closed or self._waiting or frame.raw is None or type(params) is not dict \
                or not params.keys() <= _RELAYED_PARAMETERS or not self._started.is_set():
            return None
        code, name = params.get("code"), params.get("name")
        text = None
        if name is not None and (type(name) is not str or not name or "\x00" in name):
            return None
        if code is None:
            if name is None:
                return None
            known = self._known.get(name)
            if known is None:
                return None
            text = known[0]
        elif type(code) is not str:
            return None
        worker = self._least_busy()
        if worker is None:
            return None
        qid = next(self._ids)
        return self._register(worker, qid, channel, self._config.executionTimeout,
                              (name, code, code) if name is not None and code is not None else None,
                              wire.pack_relay(qid, frame.reply_address, text, frame.raw))

    def settle(self, query: _Query) -> Outcome:
        """The end of a query whose future is done: its Outcome, or the QueryError to answer with (a
        timeout, a worker's death, the code's error). Raises CancelledError for a query the caller
        stopped waiting for (the worker is told to stop it)."""
        future = query.future
        if future.cancelled():
            self._abandon(query.worker, query, "the connector stopped waiting for it")
            raise asyncio.CancelledError
        error = future.exception()
        if error is None:
            self._remember(query)
            return future.result()
        if isinstance(error, _Expired):
            self.timeouts += 1
            self._abandon(query.worker, query, f"its timeout of {query.limit:g} s passed")
            raise timeout_error(query.limit)
        if isinstance(error, QueryError) and error.code not in _COMPILE_ERRORS:
            self._remember(query)
        raise error

    def _send(self, worker: _Worker, job: Job, channel: ReplyChannel) -> _Query:
        request = job.request
        known = (request.cache_key, job.source_text, job.fingerprint) \
            if request.cache_key is not None and request.cache_code and not request.dry_run \
            and job.source_text is not None else None
        qid = next(self._ids)
        return self._register(worker, qid, channel, job.timeout, known,
                              wire.pack(("run", qid, job, channel.reply_address)))

    def _register(self, worker: _Worker, qid: int, channel: ReplyChannel, limit: float | None,
                  known: tuple[str, str, Any] | None, message: bytes) -> _Query:
        """The query becomes the worker's (its death or close() answers it) and its message goes out."""
        loop = asyncio.get_running_loop()
        query = _Query(qid, channel, loop.create_future(), worker, 0.0, limit, known)
        worker.inflight[qid] = query
        worker.send_run(message)
        if limit:
            self._watch_deadline(query, loop)
        return query

    def _watch_deadline(self, query: _Query, loop: asyncio.AbstractEventLoop) -> None:
        """Timeouts are checked by one sweep every SWEEP_INTERVAL while queries with one run, not by a
        timer per query (a timer handle made and cancelled per query cost ~2 us of the connector's CPU)."""
        query.deadline = loop.time() + query.limit
        if self._sweeping is None:
            self._sweeping = loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        self._sweeping = None
        loop = asyncio.get_running_loop()
        now, waiting = loop.time(), False
        for worker in self._workers:
            for query in worker.inflight.values():
                if query.deadline and not query.future.done():
                    if query.deadline <= now:
                        query.future.set_exception(_Expired())   # its waiter answers, and stops the run
                    else:
                        waiting = True
        if waiting and not self._closed:
            self._sweeping = loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _with_source(self, job: Job) -> Job:
        """Name-only queries carry the code text the name was last cached with: any worker can run them."""
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
            self._cache_misses += 1
            raise QueryError(errors.NO_CACHE, "No code is cached under the name {0}; send the code with it.",
                             [key])
        return Job(request, known[0], known[1], job.runtime_info, job.timeout, job.rich_results)

    def _remember(self, query: _Query) -> None:
        """What a name's code is, once a query ran it: any worker can then run name-only queries."""
        if query.known is not None:
            name, text, fingerprint = query.known
            self._known[name] = (text, fingerprint)

    def _abandon(self, worker: _Worker, query: _Query, why: str) -> None:
        """Stop a query the caller no longer waits for; kill its worker if it does not let go in time."""
        if not worker.alive or query.qid not in worker.inflight:
            return
        worker.send(("cancel", query.qid))
        worker.cancelling.add(query.qid)    # it may be stuck in synchronous code: send it nothing new
        reason = f"it did not stop the query {query.channel.reply_address} within {KILL_GRACE:g} s after {why}"

        def kill_if_stuck() -> None:
            if worker.alive and query.qid in worker.inflight:
                log.warning("source %s: killing worker %d: %s", self.source_name, worker.index, reason)
                worker.kill(f"the connector stopped it: {reason}")

        asyncio.get_running_loop().call_later(KILL_GRACE, kill_if_stuck)

    # ---- dispatch ---------------------------------------------------------------------------
    def _least_busy(self) -> _Worker | None:
        best = None
        for worker in self._workers:
            if worker.alive and worker.ready and not worker.cancelling and worker.load < self._per_worker:
                if best is None or worker.load < best.load:
                    best = worker
        return best

    async def _acquire(self) -> _Worker:
        while True:
            worker = self._least_busy()
            if worker is not None and not self._waiting:
                return worker
            if len(self._waiting) >= self._max_queued:
                running = sum(len(w.inflight) for w in self._workers)
                raise QueryError(errors.BUSY, "The source {0} is busy: {1} queries are running and {2} are "
                                              "waiting (maxQueuedQueries). Try again later.",
                                 [self.source_name, running, len(self._waiting)])
            ticket = asyncio.get_running_loop().create_future()
            self._waiting.append(ticket)
            self._dispatch_waiting()
            try:
                worker = await ticket
            except asyncio.CancelledError:
                if ticket.done() and not ticket.cancelled() and ticket.exception() is None:
                    ticket.result().reserved -= 1
                    self._dispatch_waiting()
                else:
                    with contextlib.suppress(ValueError):
                        self._waiting.remove(ticket)
                raise
            worker.reserved -= 1
            if worker.alive:
                return worker

    def _dispatch_waiting(self) -> None:
        while self._waiting:
            worker = self._least_busy()
            if worker is None:
                return
            ticket = self._waiting.popleft()
            if ticket.done():
                continue
            worker.reserved += 1
            ticket.set_result(worker)

    # ---- workers ----------------------------------------------------------------------------
    def _background(self, coro: Awaitable[Any], name: str) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        task.set_name(f"pyexec-{self.source_name}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_task(self, coro: Awaitable[Any], name: str) -> None:
        # cancelling a spawn midway would leave a process nobody watches
        task = asyncio.ensure_future(coro)
        task.set_name(f"pyexec-{self.source_name}-{name}")
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_all(self) -> None:
        try:
            await asyncio.gather(*(self._start(w) for w in self._workers), return_exceptions=True)
        finally:
            self._started.set()

    async def _start(self, worker: _Worker, delay: float = 0.0) -> None:
        if delay:
            worker.backing_off = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
            worker.backing_off = False
        if self._closed:
            worker.alive = False
            return
        parent_end, child_end = socket.socketpair()
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pyexec_connector.engine.worker", str(child_end.fileno()), str(os.getpid()),
                pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, env=_worker_environment())
        except OSError as exc:
            parent_end.close()
            log.error("source %s: cannot start a worker process: %s", self.source_name, exc)
            self._replace_later(worker, f"it could not be started: {exc}")
            return
        finally:
            child_end.close()
        worker.reader, worker.writer = await wire.open_pipe(parent_end, 2 ** 20, trusted=False)
        worker.reader.on_data = worker.heard
        worker.reader.after = self._write_link    # a worker's answers go out in the step they came in
        self._background(self._watch(worker), f"watch-{worker.index}")
        if self._closed:                  # close() ran while it was starting
            worker.kill("the engine closed")
            return
        worker.send(("init", {
            "source_name": self.source_name, "server_config": self._server_config,
            "healthy": self._health.declared, "cache_capacity": self._config.codeCacheSize,
            "forbid": self._forbid, "memory_limit_mb": self._config.memoryLimitMB,
            "runtime_info": self._config.returnRuntimeInformation,
            "rich_results": self._config.resultValues == "rich",
            "max_message_bytes": self._max_message_bytes}))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                hello = await wire.read(worker.reader, trusted=False)
            if hello[0] != "ready":
                raise ValueError(f"unexpected first message {hello[0]!r}")
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, this worker is not usable
            log.error("source %s: worker %d did not start: %s", self.source_name, worker.index,
                      type(exc).__name__)
            worker.kill("it did not start")
            return
        worker.ready = worker.became_ready = True
        worker.reader_task = self._background(self._read(worker), f"read-{worker.index}")
        log.debug("source %s: worker %d ready (pid %s)", self.source_name, worker.index, hello[1])
        self._dispatch_waiting()

    async def _read(self, worker: _Worker) -> None:
        """Everything a worker says, handled in the order it said it."""
        reader = worker.reader
        at_once = functools.partial(self._handle_at_once, worker) if self._is_drained is not None else None
        while True:
            reader.handler = at_once
            try:
                message = await wire.read(reader, trusted=False)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            except Exception as exc:   # noqa: BLE001 - a garbled stream: the worker cannot be trusted
                log.error("source %s: worker %d sent a bad message (%s); replacing it", self.source_name,
                          worker.index, exc)
                worker.kill(f"it sent a malformed message ({type(exc).__name__})")
                return
            finally:
                reader.handler = None
            if worker.broken:
                return
            if isinstance(message, tuple) and len(message) == 2 and message[0] == "health":
                try:        # awaited here: it takes effect before the code's next reply goes out
                    await self._health.declare(bool(message[1]))
                except Exception:   # noqa: BLE001 - a failing health listener is not the worker's fault
                    log.exception("source %s: declaring health failed", self.source_name)
                continue
            await self._drained()     # it may have come while the link was backed up (see _handle_at_once)
            try:
                self._handle(worker, message)
            except Exception:   # noqa: BLE001
                log.exception("source %s: bad message from worker %d", self.source_name, worker.index)
                worker.kill("it sent a malformed message")
                return
            await self._drained()     # the link is slow: stop reading, and the worker's writes wait

    def _handle_at_once(self, worker: _Worker, message: Any) -> bool:
        """A message arriving while the reading task waits, handled as it arrives when the task would
        handle it without waiting (not a health change, the link not backed up): see wire.Reader."""
        if message is wire.ACKED:
            return True
        if type(message) is not tuple or not message or message[0] == "health" or not self._is_drained():
            return False
        try:
            self._handle(worker, message)
        except Exception:   # noqa: BLE001
            log.exception("source %s: bad message from worker %d", self.source_name, worker.index)
            worker.broken = True
            worker.reader.handler = None
            worker.kill("it sent a malformed message")
        return True

    def _handle(self, worker: _Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "ack":
            return
        if kind == "reply":
            _, qid, frame, terminal, status, error_code = message
            query = worker.inflight.get(qid)
            if query is None:
                log.warning("source %s: reply %s from worker %d for a finished query dropped",
                            self.source_name, status, worker.index)
            else:
                query.channel.forward(frame, terminal, status, error_code)
        elif kind == "link":
            self._send_link(message[1])
        elif kind == "answered":     # the worker built the 200 reply: it goes out now, then the run ends
            _, qid, frame, worker.cache_counts = message
            query = worker.inflight.get(qid)
            if query is not None and not query.future.done():
                if not isinstance(frame, str):
                    raise TypeError("answered without a frame")
                query.channel.forward(frame, True, protocol.STATUS_COMPLETE)
            self._finish(worker, qid, _ANSWERED, None)
        elif kind == "done":
            _, qid, results, runtime, output, dry_run, worker.cache_counts = message
            self._finish(worker, qid, Outcome(results, runtime, output, dry_run), None)
        elif kind == "failed":
            _, qid, error, worker.cache_counts = message
            if not isinstance(error, QueryError):
                raise TypeError("failed without a QueryError")
            self._finish(worker, qid, None, error)
        elif kind == "cancelled":
            self._finish(worker, message[1], None, None)
        elif kind == "refused":     # a relayed query's WITH clause is wrong: nothing ran
            _, qid, error, worker.cache_counts = message
            if not isinstance(error, QueryError):
                raise TypeError("refused without a QueryError")
            query = worker.inflight.get(qid)
            if query is not None:
                query.known = None
            self._finish(worker, qid, None, error)
        else:
            raise ValueError(f"unknown message {kind!r}")

    def _finish(self, worker: _Worker, qid: int, outcome: Outcome | None, error: QueryError | None) -> None:
        query = worker.inflight.pop(qid, None)
        worker.cancelling.discard(qid)
        if query is not None and not query.future.done():
            if error is not None:
                query.future.set_exception(error)
            elif outcome is not None:
                query.future.set_result(outcome)
            else:
                query.future.set_exception(QueryError(errors.INTERNAL_ERROR, "The worker cancelled the query."))
        self._dispatch_waiting()

    async def _watch(self, worker: _Worker) -> None:
        """Wait for the worker's end: fail its queries (after reading what it said last), replace it."""
        returncode = await worker.proc.wait()
        worker.ready = False              # no new queries while its last words are read
        if worker.reader_task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(worker.reader_task), 1.0)
            worker.reader_task.cancel()
        worker.alive = False
        if worker.writer is not None:
            worker.writer.close()
        what = describe_exit(returncode, killed_by_us=worker.kill_reason is not None)
        if worker.kill_reason:
            what = f"{what}; {worker.kill_reason}"
        if not self._closed:
            level = logging.DEBUG if worker.kill_reason and not worker.inflight else logging.WARNING
            log.log(level, "source %s: worker %d ended (%s) with %d queries running; replacing it",
                    self.source_name, worker.index, what, len(worker.inflight))
        error = QueryError(errors.WORKER_DIED, "The worker process running the code ended: {0}.", [what]) \
            if not self._closed else _shutting_down()
        for query in worker.inflight.values():
            if not query.future.done():
                query.future.set_exception(error)
        worker.inflight.clear()
        if not self._closed:
            self._replace_later(worker, what)
        self._dispatch_waiting()

    def _replace_later(self, worker: _Worker, why: str) -> None:
        worker.alive = False
        self._cache_hits += worker.cache_counts[0]
        self._cache_misses += worker.cache_counts[1]
        index = worker.index
        fresh = _Worker(index)
        fresh.restarts = 0 if worker.became_ready else worker.restarts + 1
        self._workers[index] = fresh
        self.worker_restarts += 1
        # a worker that dies before it is ready (bad memoryLimitMB, broken install) is retried with backoff
        delay = min(RESTART_DELAY_MAX, 0.5 * 2 ** fresh.restarts) if fresh.restarts else 0.0
        if fresh.restarts and not any(w.ready and w.alive for w in self._workers):
            # workers die before they are ready: queued queries would wait for nothing
            self._fail_waiting(QueryError(errors.WORKER_DIED, "No worker process is available: {0}.", [why]))
        self._spawn_task(self._start(fresh, delay), f"start-{index}")

    def _fail_waiting(self, error: QueryError) -> None:
        while self._waiting:
            ticket = self._waiting.popleft()
            if not ticket.done():
                ticket.set_exception(error)

    async def _health_changed(self, healthy: bool) -> None:
        for worker in self._workers:
            worker.send(("health", healthy))

    # ---- lifecycle --------------------------------------------------------------------------
    async def close(self) -> None:
        """Answer everything still waiting or running (shutting down), then stop the workers."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None
        with contextlib.suppress(ValueError):
            self._health.listeners.remove(self._health_changed)
        self._fail_waiting(_shutting_down())
        for worker in self._workers:
            for query in worker.inflight.values():
                if not query.future.done():
                    query.future.set_exception(_shutting_down())
            worker.send(("stop",))
        if self._starting:
            await asyncio.wait(set(self._starting), timeout=2 * STOP_GRACE)
        procs = [w.proc for w in self._workers if w.proc is not None and w.proc.returncode is None]
        if procs:
            done, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs],
                                               timeout=STOP_GRACE)
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            for task in pending:
                with contextlib.suppress(Exception):
                    await task
        if self._starting:       # their processes are gone now: they end at once
            await asyncio.wait(set(self._starting), timeout=STOP_GRACE)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self._workers:
            if worker.writer is not None:
                worker.writer.close()
        self._started.set()

    async def retire(self) -> None:
        """After a reconfigure changed the pool: let the queries already here finish, then close."""
        while any(w.inflight or w.reserved for w in self._workers) or self._waiting:
            await asyncio.sleep(0.05)
        await self.close()


_ANSWERED = Outcome(answered=True)
# WITH parameters a relayed query may have; the others need the connector (see ProcessEngine.relay)
_RELAYED_PARAMETERS = frozenset({"code", "name", "presetValues", "codeHandlesReturn", "limitReturnTo",
                                 "captureOutput"})


class _Expired(Exception):
    """A query's timeout passed (set on its future by ProcessEngine._sweep)."""


def _worker_environment() -> dict[str, str]:
    """The connector's environment without the access token: user code never sees it."""
    return {k: v for k, v in os.environ.items() if k != TOKEN_ENV}


def _shutting_down() -> QueryError:
    return QueryError(errors.SHUTTING_DOWN, "The connector stopped the source's workers before the query "
                                            "finished; send the query again.")

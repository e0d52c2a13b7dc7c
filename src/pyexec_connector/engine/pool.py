"""WorkerPool: the one owner of a source's worker processes — how many run, starting, watching,
replacing and stopping them — in the manner of gunicorn's arbiter: one supervision `tick` (every TICK
seconds) pings silent workers and kills wedged ones (judged by engine/liveness.py), retires idle ones
(engine/scaling.py) and brings the count back to `minWorkers`; the same loop reaps a worker whose process
ended as soon as it does (`_reap_workers` -> `_ended`, the one place). What cannot wait for it is
handled as it happens, by the same methods: a query that finds no worker (`scale`), a query's end
(`query_ended`: recycling, engine/recycle.py). A worker's state
(WorkerState) changes only here, through WorkerHandle.become, which refuses a transition not allowed.

Nothing here calls the pool's owner (the process engine): what happens to workers comes back to it as
one stream of events (`events()`: WorkerReady, WorkerEnded, NoWorkerStarts), and a ready worker's
messages go to what the engine serves it with. Which queries a worker runs is the engine's
(`WorkerHandle.inflight`)."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple

from .. import forkguard, sandbox
from . import recycle, wire, zygote
from .handle import WorkerHandle, WorkerState
from .launch import WorkerLauncher, WorkerProcess
from .liveness import LivenessPolicy, Verdict
from .messages import Init, Stop
from .oom import sigkill_hint
from .recycle import RecyclePolicy
from .scaling import ScalePolicy

log = logging.getLogger("pyexec_connector.engine.process")

START_TIMEOUT = 60.0      # seconds a new worker has to say it is ready
STOP_GRACE = 2.0          # seconds workers have to exit at close before they are killed
RESTART_DELAY_MAX = 30.0
LAST_WORDS = 1.0          # seconds to read what a worker that ended wrote last
TICK = 0.5                # seconds between supervision ticks


class WorkerReady(NamedTuple):
    """It finished its handshake and is READY: the engine serves it (WorkerHandle.serve) and dispatches."""
    worker: WorkerHandle


class WorkerEnded(NamedTuple):
    """It ended (`what`: how) and is DEAD, out of the pool: the queries it held fail."""
    worker: WorkerHandle
    what: str


class NoWorkerStarts(NamedTuple):
    """Workers die before they are ready: queries waiting for one would wait for nothing."""
    why: str


PoolEvent = WorkerReady | WorkerEnded | NoWorkerStarts


class EventStream:
    """The pool's events, in order, for its one follower (the engine): a few per worker's life, taken as
    they come, so what waits stays small."""

    def __init__(self) -> None:
        self._events: deque[PoolEvent] = deque()
        self._evented = asyncio.Event()
        self._closed = False

    def publish(self, event: PoolEvent) -> None:
        self._events.append(event)
        self._evented.set()

    def close(self) -> None:
        """The stream ends once what was published before is taken."""
        self._closed = True
        self._evented.set()

    async def follow(self) -> AsyncIterator[PoolEvent]:
        events, evented = self._events, self._evented
        while True:
            while events:
                yield events.popleft()
            if self._closed:
                return
            evented.clear()
            await evented.wait()


class Alarm:
    """What the supervision loop sleeps on: `seconds`, or until rung (a process ended, or stop()). One
    future and one timer per sleep, so a ring resumes the loop in one step (a worker's death is answered
    that much sooner than through an Event and wait_for's task)."""

    def __init__(self) -> None:
        self._waker: asyncio.Future[None] | None = None
        self._rung = False

    async def sleep(self, seconds: float) -> None:
        if self._rung:
            self._rung = False
            return
        loop = asyncio.get_running_loop()
        waker = self._waker = loop.create_future()
        timer = loop.call_later(seconds, _wake_up, waker)
        try:
            await waker
        finally:
            timer.cancel()
            self._waker = None
            self._rung = False

    def ring(self) -> None:
        self._rung = True
        _wake_up(self._waker)


def _wake_up(waker: asyncio.Future[None] | None) -> None:
    if waker is not None and not waker.done():
        waker.set_result(None)


class WorkerPool:
    """Runs between `scale.min_workers` and `scale.max_workers` workers as the load asks (scale()), replaces
    dead ones (with a backoff when they die before ready), recycles, supervises and stops them."""

    def __init__(self, source_name: str, scale: ScalePolicy, settings: Callable[[], dict[str, Any]],
                 max_message_bytes: int | None, preload: Sequence[str] = (),
                 recycle: RecyclePolicy = RecyclePolicy(), spawn_options: Callable[[], dict[str, Any]] | None = None,
                 liveness: LivenessPolicy = LivenessPolicy(), python: str | None = None):
        self.source_name = source_name
        self.scale_policy = scale
        self.recycle_policy = recycle
        self.recycles: dict[str, int] = {}      # workers recycled, by reason (RecycleReason)
        self.events = EventStream()     # how its owner hears of workers (the pool calls nothing of its owner's)
        self._settings = settings
        # the worker's environment (no secrets) and the user it becomes (sandbox.worker_spawn_options)
        self._spawn_options = spawn_options or (lambda: sandbox.worker_spawn_options(None))
        # forks workers from the zygote of the preload list (spawns them when it cannot): see launch.py;
        # `python`: the interpreter of a per-script environment (docs/ENVIRONMENTS.md), None: the connector's
        self.launcher = WorkerLauncher(zygote.registry(), preload, source_name, self._spawn_options, python=python)
        self._max_size = wire.frame_limit(max_message_bytes) if max_message_bytes else None
        self.workers: list[WorkerHandle] = []
        self._indexes = itertools.count()
        self._failed_starts = 0                 # workers in a row that died before they were ready
        self.restarts = 0
        self.idle_retired = 0                   # workers beyond minWorkers ended after workerIdleSeconds
        self.liveness = liveness
        self.wedged = 0                         # workers killed for not answering a liveness ping
        self.retired_cache_counts = (0, 0)      # of workers gone
        self.closed = False
        self._closing = asyncio.Event()
        self._alarm = Alarm()                   # wakes the supervision loop: a process ended, or stop()
        self.started = asyncio.Event()          # every first start ended (ready or not)
        self._tasks: set[asyncio.Task] = set()
        self._starting: set[asyncio.Task] = set()   # starts under way: stop() waits for them, never cancels
        # (cancelling one midway would leave a process nobody watches)
        self.launcher_open = False
        self._background(self._start_all(), "start", self._starting)

    def alive_count(self) -> int:
        """Processes alive or starting (not those waiting to retry after failed starts)."""
        return sum(1 for w in self.workers if w.alive and not w.backing_off)

    def can_run(self) -> bool:
        """The first workers are starting, a worker is up, or one can be forked on demand (minWorkers 0)."""
        return not self.started.is_set() or self.alive_count() > 0 \
            or (self.scale_policy.min_workers == 0 and not self._failed_starts)

    def credit_ledger(self) -> list[tuple[int, int, int, int]]:
        """(index, runs asked for, said read, sent) per worker taking queries: sent never passes asked for."""
        return [(w.index, w.channel.granted, w.channel.received, w.channel.sent)
                for w in self.workers if w.state in _SUPERVISED]

    # ---- how many run ------------------------------------------------------------------------------
    def can_grow(self) -> bool:
        """Whether a query finding every worker busy should wait for a fork (one more, or one on its way)
        rather than share a busy worker. Asked once per query while every worker is busy: no list built."""
        if self.closed or self._failed_starts:
            return False
        live = 0
        for w in self.workers:
            state = w.state
            if state is _STARTING:
                return True
            live += state is _READY
        return live < self.scale_policy.max_workers

    def scale(self, waiting: int = 0) -> None:
        """The one place that decides how many workers start: what ScalePolicy.to_start says for `waiting`
        queries that found no idle worker (retiring idle ones is the tick's)."""
        if self.closed or not self.launcher_open:
            return
        live = busy = 0
        for w in self.workers:          # called while queries wait, per dispatch: no lists built
            if w.state is _READY:
                live += 1
                busy += bool(w.load or w.stalled or w.credit <= 0)
            elif w.state is _STARTING:
                live += 1
        if live < self.scale_policy.max_workers:
            for _ in range(self.scale_policy.to_start(live, busy, waiting)):
                self._add()

    def set_scale_policy(self, policy: ScalePolicy) -> None:
        self.scale_policy = policy
        self.scale()

    # ---- the supervision tick ----------------------------------------------------------------------
    async def _supervise(self) -> None:
        """gunicorn's arbiter's loop: reaps as soon as a process ends (as SIGCHLD wakes it), ticks every TICK s."""
        next_tick = time.monotonic() + TICK
        while not self.closed:
            await self._alarm.sleep(max(0.0, next_tick - time.monotonic()))
            if self.closed:
                return
            try:
                await self._reap_workers()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK
                    self.tick()
            except Exception:   # noqa: BLE001 - supervision must go on
                log.exception("source %s: supervising the workers failed", self.source_name)

    def tick(self) -> None:
        """One supervision step: liveness of each worker, idle ones retired, the count brought back."""
        now = time.monotonic()
        for worker in [w for w in self.workers if w.state in _SUPERVISED and w.pipe is not None]:
            if worker.backlog:      # what it said waits (the link is backed up), unread: its silence says nothing
                worker.last_heard, worker.pinged_at = now, None
            elif _judge(worker, self.liveness, now, self.source_name):
                self.wedged += 1
        idle = {w: None if w.load else w.idle_since for w in self.workers if w.state is _READY}
        for worker in self.scale_policy.to_retire(idle, now):
            self.idle_retired += 1
            self._retire(worker, f"idle for {self.scale_policy.idle_seconds:g} s (workerIdleSeconds)")
        self.scale()

    def hold(self, worker: WorkerHandle) -> None:
        """It was told to stop a query: it takes nothing new until it lets go (release)."""
        if worker.state is _READY:
            worker.become(WorkerState.DRAINING)

    def release(self, worker: WorkerHandle) -> None:
        if worker.state is WorkerState.DRAINING:
            worker.become(_READY)

    def broadcast(self, message: Any) -> None:
        for worker in self.workers:
            worker.send(message)

    # ---- starting ----------------------------------------------------------------------------------
    def _background(self, coro: Awaitable[Any], name: str, tasks: set[asyncio.Task] | None = None) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"pyexec-{self.source_name}-{name}")
        tasks = self._tasks if tasks is None else tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _start_all(self) -> None:
        try:
            await self.launcher.open()
            if self.closed:                   # stop() ran while the zygote started: give it back
                await self.launcher.close()
                return
            self.launcher_open = True
            self.scale()
            await asyncio.gather(*(t for t in self._starting if t is not asyncio.current_task()),
                                 return_exceptions=True)
            self._background(self._supervise(), "supervise")
        finally:
            self.started.set()

    def _add(self) -> None:
        """The one place a worker is started (after failed starts, with a backoff)."""
        worker = WorkerHandle(next(self._indexes), self._failed_starts, self.recycle_policy.budget(), self._max_size)
        self.workers.append(worker)
        # a worker that dies before it is ready (bad memoryLimitMB, broken install) is retried with backoff
        delay = min(RESTART_DELAY_MAX, 0.5 * 2 ** self._failed_starts) if self._failed_starts else 0.0
        self._background(self._start(worker, delay), f"start-{worker.index}", self._starting)

    async def _start(self, worker: WorkerHandle, delay: float = 0.0) -> None:
        if delay:
            worker.backing_off = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
            worker.backing_off = False
        if self.closed:
            worker.become(WorkerState.DEAD)
            return
        try:
            launched = await self.launcher.launch()
        except OSError as exc:
            log.error("source %s: cannot start a worker process: %s", self.source_name, exc)
            self._ended(worker, f"it could not be started: {exc}")
            return
        worker.proc, worker.peer = launched.process, launched.peer
        parent_end = launched.sock
        forkguard.protect(parent_end.fileno())
        await worker.connect(parent_end)
        worker.fd = parent_end.fileno()
        self._background(self._wait_for_end(worker), f"wait-{worker.index}")
        if self.closed:                  # stop() ran while it was starting
            worker.kill("the engine closed")
            return
        try:
            hello = await worker.handshake(Init(self._settings()), START_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, this worker is not usable
            log.error("source %s: worker %d did not start: %s", self.source_name, worker.index, type(exc).__name__)
            worker.kill("it did not start")
            return
        worker.become(_READY)
        worker.became_ready = True
        self._failed_starts = 0
        worker.idle_since = worker.last_heard = time.monotonic()
        log.debug("source %s: worker %d ready (pid %s)", self.source_name, worker.index, hello.pid)
        self.events.publish(WorkerReady(worker))

    # ---- reaping ------------------------------------------------------------------------------------
    async def _wait_for_end(self, worker: WorkerHandle) -> None:
        """Its process's end wakes the supervision loop, which reaps it."""
        assert worker.proc is not None
        worker.exit_code = await worker.proc.wait()
        worker.exited = True
        self._alarm.ring()

    async def _reap_workers(self) -> None:
        """The workers whose process ended: what each wrote last is read and taken (together, within
        LAST_WORDS seconds), then each end is handled (_ended: its queries fail, it is replaced)."""
        ended = [w for w in self.workers if w.exited and w.state is not WorkerState.DEAD]
        if not ended:
            return
        for worker in ended:
            worker.ended()
            worker.become(WorkerState.STOPPING)      # no new queries while its last words are read
        if len(ended) == 1:       # (gather would wrap it in a task: a loop step more before its queries fail)
            await ended[0].last_words(LAST_WORDS)
        else:
            await asyncio.gather(*(w.last_words(LAST_WORDS) for w in ended))
        for worker in ended:
            worker.become(WorkerState.DEAD)
            if worker.fd is not None:
                forkguard.release(worker.fd)
            worker.close()
            self._ended(worker, _how_it_ended(worker, self.source_name, self.closed))

    def _ended(self, worker: WorkerHandle, why: str) -> None:
        """The one place a worker's end is handled: its queries fail (WorkerEnded, the engine's), and scale()
        starts what is now missing: below minWorkers, or for queries that wait."""
        worker.become(WorkerState.DEAD)
        with contextlib.suppress(ValueError):
            self.workers.remove(worker)
        hits, misses = self.retired_cache_counts
        self.retired_cache_counts = (hits + worker.cache_counts[0], misses + worker.cache_counts[1])
        if not worker.kill_reason or not worker.kill_reason.startswith("idle"):
            self.restarts += 1
        if not worker.became_ready and not self.closed:
            self._failed_starts += 1
        self.events.publish(WorkerEnded(worker, why))
        if self.closed:
            return
        if self._failed_starts and not any(w.state is WorkerState.READY for w in self.workers):
            self.events.publish(NoWorkerStarts(why))
        self.scale()

    # ---- recycling ---------------------------------------------------------------------------------
    def set_recycle_policy(self, policy: RecyclePolicy) -> None:
        """A new configuration's limits, for running workers too (their query counts are kept)."""
        self.recycle_policy = policy
        for worker in self.workers:
            queries, worker.budget = worker.budget.queries, policy.budget()
            worker.budget.queries = queries

    def query_ended(self, worker: WorkerHandle) -> None:
        """A query on `worker` ended: past maxQueriesPerWorker or maxWorkerMemoryMB, it takes nothing new,
        finishes what it runs and is replaced (no query fails for it: those arriving meanwhile wait)."""
        state = worker.state
        if state is WorkerState.RETIRING:
            _stop_if_idle(worker)
            return
        if state is not _READY and state is not WorkerState.DRAINING:
            return
        if not worker.inflight and not worker.reserved:
            worker.idle_since = time.monotonic()
        if not worker.budget.limited:       # the common case, per query: counted, nothing to decide
            worker.budget.queries += 1
            return
        reason = _recycle_reason(worker, self.recycle_policy, self.source_name)
        if reason is not None:
            self.recycles[reason] = self.recycles.get(reason, 0) + 1
            self._retire(worker, f"recycled ({reason})")     # its end is expected: no warning

    def _retire(self, worker: WorkerHandle, why: str) -> None:
        worker.become(WorkerState.RETIRING)
        worker.kill_reason = why
        log.debug("source %s: worker %d retires: %s", self.source_name, worker.index, why)
        _stop_if_idle(worker)

    # ---- stopping ----------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Ask every worker to exit, kill those that do not within STOP_GRACE, and reap them all."""
        self.closed = True
        self._closing.set()
        self.events.close()
        self._alarm.ring()
        self.broadcast(Stop())
        if self._starting:
            await asyncio.wait(set(self._starting), timeout=2 * STOP_GRACE)
        await _reap([w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None])
        if self._starting:       # their processes are gone now: they end at once
            await asyncio.wait(set(self._starting), timeout=STOP_GRACE)
        for worker in self.workers:     # reaped now, as the supervision loop (ended) would have
            if not worker.exited and worker.proc is not None and worker.proc.returncode is not None:
                worker.exited, worker.exit_code = True, worker.proc.returncode
        await self._reap_workers()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self.workers:
            worker.close()
        await self.launcher.close()       # the zygote stops with its last pool
        self.started.set()


# Live workers (counted against `workers`) are those starting or ready. A draining worker is not counted:
# it holds a query past its timeout and is killed unless it lets go within KILL_GRACE, and the next query
# should not wait for that (it may run `workers` + 1 meanwhile).
_READY, _STARTING = WorkerState.READY, WorkerState.STARTING
_SUPERVISED = frozenset({WorkerState.READY, WorkerState.DRAINING, WorkerState.RETIRING})


def credit_figures(ledger: list[tuple[int, int, int, int]]) -> dict[str, int]:
    """credit: runs the workers asked for and were not sent yet; credit_overdrawn: runs sent beyond what
    was asked for (0, always)."""
    return {"credit": sum(max(0, granted - sent) for _, granted, _, sent in ledger),
            "credit_overdrawn": sum(max(0, sent - granted) for _, granted, _, sent in ledger)}


def _recycle_reason(worker: WorkerHandle, policy: RecyclePolicy, source_name: str) -> str | None:
    """Why the worker is recycled after the query that just ended (RecycleReason's value), if it is."""
    budget = worker.budget
    memory = recycle.resident_bytes(worker.proc.pid) if policy.watches_memory and worker.proc else None
    reason = budget.after_query(memory)
    if reason is None:
        return None
    log.info("source %s: recycling worker %d (%s: %d queries, %s MiB resident)", source_name, worker.index,
             reason.value, budget.queries, "?" if memory is None else memory >> 20)
    return reason.value


def _stop_if_idle(worker: WorkerHandle) -> None:
    """A retiring worker that holds nothing is told to stop, and killed if it does not."""
    if worker.inflight or worker.reserved:
        return
    worker.send(Stop())

    def kill_if_still_there() -> None:
        if worker.alive and worker.proc is not None and worker.proc.returncode is None:
            worker.kill("it did not stop after it was recycled")

    asyncio.get_running_loop().call_later(STOP_GRACE, kill_if_still_there)


def _how_it_ended(worker: WorkerHandle, source_name: str, closed: bool) -> str:
    what = describe_exit(worker.exit_code, killed_by_us=worker.kill_reason is not None)
    if worker.kill_reason:
        what = f"{what}; {worker.kill_reason}"
    if not closed:
        level = logging.DEBUG if worker.kill_reason and not worker.inflight else logging.WARNING
        log.log(level, "source %s: worker %d ended (%s) with %d queries running; replacing it",
                source_name, worker.index, what, len(worker.inflight))
    return what


def _judge(worker: WorkerHandle, liveness: LivenessPolicy, now: float, source_name: str) -> bool:
    """Act on the liveness verdict for one worker; True when it was killed as wedged."""
    verdict = liveness.verdict(now, worker.last_heard, worker.pinged_at, len(worker.inflight))
    if verdict is Verdict.PING:
        worker.ping()
    elif verdict is Verdict.SILENT:
        if not worker.stalled:
            worker.stalled = True      # the dispatcher passes it by until it writes again
            log.warning("source %s: worker %d has not answered for %.1f s while running queries; no new "
                        "queries go to it until it does", source_name, worker.index, now - worker.last_heard)
    elif verdict is Verdict.WEDGED:
        log.warning("source %s: worker %d ran no query and did not answer a ping for %.1f s: something its "
                    "code left behind blocks it; replacing it", source_name, worker.index, now - worker.last_heard)
        worker.kill(f"it did not answer a liveness ping within {liveness.timeout:g} s")
        return True
    return False


async def _reap(procs: list[WorkerProcess]) -> None:
    """Wait STOP_GRACE for the processes to exit, kill those that did not, and reap them all."""
    if not procs:
        return
    _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=STOP_GRACE)
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    for task in pending:
        with contextlib.suppress(Exception):
            await task


def describe_exit(returncode: int | None, killed_by_us: bool = False) -> str:
    if returncode is None:
        return "unknown exit"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        hint = sigkill_hint() if -returncode == signal.SIGKILL and not killed_by_us else ""
        return f"killed by signal {name} ({-returncode}){hint}"
    return f"exit code {returncode}"


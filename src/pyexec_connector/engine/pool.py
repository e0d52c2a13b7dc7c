"""WorkerPool: the one owner of a source's worker processes — how many run, starting, watching,
reading, replacing and stopping them. Each worker's lifecycle is an explicit state (WorkerState).

How many run is decided in one place, `WorkerPool.scale` (with engine/scaling.py): `minWorkers` warm,
one more forked for each query that finds every worker busy, up to `workers`; those beyond `minWorkers`
retire after `workerIdleSeconds` idle. Workers are started in one place (`_add`) and their ends handled
in one place (`_ended`). Liveness: the pool's `Supervisor` (engine/supervisor.py, judged by
engine/liveness.py) pings each worker that has been silent; one that does not answer and runs nothing is
killed, and the queries sent to it that it never read go to another worker.

What the workers say goes to the pool's owner (the process engine) through `PoolEvents`; the pool
knows nothing of queries beyond counting them on each worker (`WorkerHandle.inflight`)."""
from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import itertools
import logging
import signal
import struct
import termios
import time
from collections import deque
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import Any, Protocol

from .. import forkguard, sandbox
from . import recycle, wire, zygote
from .launch import WorkerLauncher, WorkerProcess
from .liveness import LivenessPolicy
from .messages import Credit, Init, Ping, Ready, Stop
from .oom import sigkill_hint
from .recycle import RecyclePolicy, WorkerBudget
from .scaling import ScalePolicy
from .supervisor import Supervisor

log = logging.getLogger("pyexec_connector.engine.process")

START_TIMEOUT = 60.0      # seconds a new worker has to say it is ready
STOP_GRACE = 2.0          # seconds workers have to exit at close before they are killed
RESTART_DELAY_MAX = 30.0
LAST_WORDS = 1.0          # seconds to read what a worker that ended wrote last


class WorkerState(enum.Enum):
    STARTING = "starting"      # spawned (or waiting to be, after failed starts); not ready yet
    READY = "ready"            # takes queries
    DRAINING = "draining"      # told to stop a query it has not let go of: takes nothing new
    RETIRING = "retiring"      # recycled (maxQueriesPerWorker, maxWorkerMemoryMB): finishes its queries, then stops
    STOPPING = "stopping"      # asked to exit, or killed; its end is being watched
    DEAD = "dead"              # ended; a fresh handle replaces it


class PoolEvents(Protocol):
    """What the pool tells its owner."""

    def take(self, worker: WorkerHandle, message: Any) -> bool:
        """A worker's message, handled now; False to have it handled by `take_later` instead (it needs
        to wait). Raising means the worker broke the protocol: it is killed."""
        ...

    async def take_later(self, worker: WorkerHandle, message: Any) -> None: ...

    def taken(self) -> None:
        """take() handled what just arrived from a worker (as it arrived): a chance to pass it on at once."""
        ...

    def worker_ready(self, worker: WorkerHandle) -> None: ...

    def worker_ended(self, worker: WorkerHandle, what: str) -> None:
        """It ended (`what`: how): fail the queries it had."""
        ...

    def no_worker_starts(self, why: str) -> None:
        """Workers die before they are ready: queries waiting for one would wait for nothing."""
        ...

    def reading(self) -> bool:
        """Whether workers' pipes are read now (not while the link is backed up): silence means nothing
        while they are not."""
        ...

    def requeue(self, worker: WorkerHandle, qids: list[int]) -> None:
        """Queries sent to `worker` that it never read: give them to another worker."""
        ...


class WorkerHandle:
    """The connector's end of one worker process (engine/worker.py is the other): what it has asked for
    (credit), what it was sent, and which of those it may not have read yet."""

    def __init__(self, index: int, restarts: int = 0, budget: WorkerBudget | None = None):
        self.index = index
        self.budget = budget or RecyclePolicy().budget()     # queries it may still run before it is recycled
        self.state = WorkerState.STARTING
        self.proc: WorkerProcess | None = None     # forked or spawned; its signals go to its process group
        self.reader: wire.Reader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task | None = None
        self.inflight: dict[int, Any] = {}      # qid -> the engine's record of a query it runs
        self.reserved = 0                       # credit promised to parsed queries that have not resumed yet
        self.cancelling: set[int] = set()       # queries told to stop (state DRAINING until it lets go)
        self.kill_reason: str | None = None
        self.restarts = restarts                # deaths in a row before becoming ready (restart backoff)
        self.became_ready = False
        self.backing_off = False                # waiting to start again after failed starts
        self.cache_counts = (0, 0)              # its code cache's hits and misses, as it last reported them
        self.granted = 0                        # runs it asked for over its life (Credit.granted)
        self.received = 0                       # runs it said it read (Credit.received)
        self.sent = 0                           # runs written to it over its life
        self.stalled = False                    # did not read a run in time: sent nothing until it writes
        self._held: list[bytes] = []            # messages not written yet: see send_run()
        self._held_size = 0
        self.written = 0                        # bytes written to it over its life
        self._unconfirmed: deque[tuple[int, int, float]] = deque()   # (qid, end offset, take_by): see overdue()
        self.last_heard = time.monotonic()      # liveness: when it last wrote anything
        self.pinged_at: float | None = None     # the ping it has not answered yet
        self.idle_since = time.monotonic()      # when it last had no query (scaling: retired after idle)

    @property
    def load(self) -> int:
        return len(self.inflight) + self.reserved

    @property
    def credit(self) -> int:
        """Runs it may be sent now: asked for, not sent, not promised to a parsed query."""
        return self.granted - self.sent - self.reserved

    @property
    def alive(self) -> bool:
        return self.state is not WorkerState.DEAD

    def send(self, message: Any) -> None:
        """Write the message now (after any held ones: order is kept)."""
        data = wire.encode(message)
        self._held.append(data)
        self._held_size += len(data)
        self.flush()

    def send_run(self, data: bytes, qid: int, take_by: float) -> None:
        """A run, against its credit; written at the next flush() (a dispatch round writes its runs to a
        worker together). Until the worker is known to have read it, it may be taken back (overdue)."""
        self._held.append(data)
        self._held_size += len(data)
        self.sent += 1
        self._unconfirmed.append((qid, self.written + self._held_size, take_by))

    def heard(self) -> None:
        """The worker wrote something: its loop runs."""
        self.last_heard = time.monotonic()
        self.pinged_at = None
        self.stalled = False

    def overdue(self, now: float, running: Container[int]) -> list[int]:
        """The runs it was sent whose take_by passed before it read them: no longer its own (it declines
        them should it read them: it reads the clock after the bytes). Taken back here, and it is stalled
        until it writes again. Its socket tells which bytes it read (a stream is read in order)."""
        self.flush()
        unconfirmed = self._unconfirmed
        while unconfirmed and unconfirmed[0][0] not in running:     # answered: read, surely
            unconfirmed.popleft()
        if not unconfirmed or unconfirmed[0][2] >= now:
            return []
        read = self.written - self._unread_bytes()
        while unconfirmed and unconfirmed[0][1] <= read:
            unconfirmed.popleft()
        late: list[int] = []
        while unconfirmed and unconfirmed[0][2] < now:      # take_by grows along the stream
            qid = unconfirmed.popleft()[0]
            if qid in running:
                late.append(qid)
        if late:
            self.stalled = True
        return late

    @property
    def unconfirmed(self) -> int:
        """Runs written whose reading is not confirmed yet (checked by overdue())."""
        return len(self._unconfirmed)

    def _unread_bytes(self) -> int:
        """Bytes written to the worker it has not read: in the transport's buffer, or the socket's (SIOCOUTQ,
        for a Unix socket the data its peer has not read)."""
        writer = self.writer
        if writer is None:
            return 0
        pending = writer.transport.get_write_buffer_size()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                pending += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                return self.written      # cannot tell: taken as unread (it declines what it reads late)
        return pending

    def ping(self) -> None:
        self.pinged_at = time.monotonic()
        self.send(Ping())

    def flush(self) -> None:
        if not self._held:
            return
        data = b"".join(self._held) if len(self._held) > 1 else self._held[0]
        self._held.clear()
        self._held_size = 0
        if self.writer is None or self.writer.is_closing():
            return       # it is dying: its watcher fails its queries
        self.written += len(data)
        try:
            self.writer.write(data)
        except (ConnectionError, RuntimeError):
            pass    # it is dying; its watcher fails its queries

    def kill(self, reason: str) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.kill_reason = self.kill_reason or reason
            if self.state is not WorkerState.DEAD:
                self.state = WorkerState.STOPPING
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class WorkerPool:
    """Runs between `scale.min_workers` and `scale.max_workers` workers as the load asks (see scale()),
    replaces dead ones (with a backoff when workers die before they are ready), recycles them, has its
    Supervisor (engine/supervisor.py) watch them, and stops them all at close.

    Longer than ~300 lines for a reason: it is the one place workers start and end (issue 11's rule);
    scaling and recycling decide in their own pure modules (scaling.py, recycle.py) but act here, on the
    same worker states. The next split, if it grows: reading a worker (_read, _broke) into WorkerHandle."""

    def __init__(self, source_name: str, scale: ScalePolicy, events: PoolEvents,
                 settings: Callable[[], dict[str, Any]], max_message_bytes: int | None, preload: Sequence[str] = (),
                 recycle: RecyclePolicy = RecyclePolicy(), spawn_options: Callable[[], dict[str, Any]] | None = None,
                 liveness: LivenessPolicy = LivenessPolicy()):
        self.source_name = source_name
        self.scale_policy = scale
        self.recycle_policy = recycle
        self.recycles: dict[str, int] = {}      # workers recycled, by reason (RecycleReason)
        # forks workers from the zygote of the preload list (spawns them when it cannot): see launch.py
        self._events = events
        self._settings = settings
        # the worker's environment (no secrets) and the user it becomes (sandbox.worker_spawn_options)
        self._spawn_options = spawn_options or (lambda: sandbox.worker_spawn_options(None))
        # forks workers from the zygote of the preload list (spawns them when it cannot): see launch.py
        self.launcher = WorkerLauncher(zygote.registry(), preload, source_name, self._spawn_options)
        self._max_size = wire.frame_limit(max_message_bytes) if max_message_bytes else None
        self.workers: list[WorkerHandle] = []
        self._indexes = itertools.count()
        self._failed_starts = 0                 # workers in a row that died before they were ready
        self._retire_timer: asyncio.TimerHandle | None = None
        self.restarts = 0
        self.idle_retired = 0                   # workers beyond minWorkers ended after workerIdleSeconds
        self.supervisor = Supervisor(source_name, self._supervised, events, liveness)
        self.retired_cache_counts = (0, 0)      # of workers gone
        self.closed = False
        self._closing = asyncio.Event()
        self.started = asyncio.Event()          # every first start ended (ready or not)
        self._tasks: set[asyncio.Task] = set()
        self._starting: set[asyncio.Task] = set()   # spawns under way: stop() waits for them, never cancels
        self.launcher_open = False
        self._spawn(self._start_all(), "start")

    def alive_count(self) -> int:
        """Processes alive or starting (not those waiting to retry after failed starts)."""
        return sum(1 for w in self.workers if w.alive and not w.backing_off)

    def can_run(self) -> bool:
        """The first workers are starting, a worker is up, or one can be forked when a query comes
        (minWorkers 0, no failed starts)."""
        return not self.started.is_set() or self.alive_count() > 0 \
            or (self.scale_policy.min_workers == 0 and not self._failed_starts)

    def credit_ledger(self) -> list[tuple[int, int, int]]:
        """(index, runs it asked for, runs it was sent) of each worker that takes queries, for metrics and
        tests: sent never passes asked for, and a dead worker's credit goes with it."""
        return [(w.index, w.granted, w.sent) for w in self.workers if w.state in _SUPERVISED]

    def credit_figures(self) -> dict[str, int]:
        """credit: runs the workers asked for and were not sent yet; credit_overdrawn: runs sent beyond
        what was asked for (0, always)."""
        ledger = self.credit_ledger()
        return {"credit": sum(max(0, granted - sent) for _, granted, sent in ledger),
                "credit_overdrawn": sum(max(0, sent - granted) for _, granted, sent in ledger)}

    # ---- how many run ------------------------------------------------------------------------------
    def can_grow(self) -> bool:
        """Whether a query finding every worker busy should wait for a fork (one more, or one on its way)
        rather than share a busy worker. Asked once per query while every worker is busy: no list built."""
        if self.closed or self._failed_starts:
            return False
        live = 0
        for w in self.workers:
            if w.state is _STARTING:
                return True
            live += w.state is _READY
        return live < self.scale_policy.max_workers

    def scale(self, waiting: int = 0) -> None:
        """The one place that decides how many workers run: starts what ScalePolicy.to_start says for
        `waiting` queries that found no idle worker (retiring idle ones is _retire_idle's, on a timer)."""
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
        if self._retire_timer is not None:
            self._retire_timer.cancel()
            self._retire_timer = None
        self.scale()
        self._plan_retire()

    def _idle(self) -> dict[WorkerHandle, float | None]:
        return {w: None if w.load else w.idle_since for w in self.workers if w.state is WorkerState.READY}

    def _plan_retire(self) -> None:
        if self._retire_timer is not None or self.closed:
            return
        now = time.monotonic()
        when = self.scale_policy.next_check(self._idle(), now)
        if when is not None:
            self._retire_timer = asyncio.get_running_loop().call_later(max(0.0, when - now) + 0.01,
                                                                       self._retire_idle)

    def _retire_idle(self) -> None:
        self._retire_timer = None
        if self.closed:
            return
        for worker in self.scale_policy.to_retire(self._idle(), time.monotonic()):
            self.idle_retired += 1
            worker.state = WorkerState.RETIRING
            worker.kill_reason = f"idle for {self.scale_policy.idle_seconds:g} s (workerIdleSeconds)"
            log.debug("source %s: worker %d retires: %s", self.source_name, worker.index, worker.kill_reason)
            self._stop_if_idle(worker)
        self._plan_retire()

    def broadcast(self, message: Any) -> None:
        for worker in self.workers:
            worker.send(message)

    # ---- starting ----------------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        # cancelling a spawn midway would leave a process nobody watches
        task = asyncio.ensure_future(coro)
        task.set_name(f"pyexec-{self.source_name}-{name}")
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    def _background(self, coro: Awaitable[Any], name: str) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        task.set_name(f"pyexec-{self.source_name}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
            self._background(self.supervisor.run(self._closing), "supervise")
        finally:
            self.started.set()

    def _add(self) -> None:
        """The one place a worker is started (after failed starts, with a backoff)."""
        worker = WorkerHandle(next(self._indexes), self._failed_starts, self.recycle_policy.budget())
        self.workers.append(worker)
        # a worker that dies before it is ready (bad memoryLimitMB, broken install) is retried with backoff
        delay = min(RESTART_DELAY_MAX, 0.5 * 2 ** self._failed_starts) if self._failed_starts else 0.0
        self._spawn(self._start(worker, delay), f"start-{worker.index}")

    async def _start(self, worker: WorkerHandle, delay: float = 0.0) -> None:
        if delay:
            worker.backing_off = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
            worker.backing_off = False
        if self.closed:
            worker.state = WorkerState.DEAD
            return
        try:
            launched = await self.launcher.launch()
        except OSError as exc:
            log.error("source %s: cannot start a worker process: %s", self.source_name, exc)
            self._ended(worker, f"it could not be started: {exc}")
            return
        worker.proc = launched.process
        parent_end = launched.sock
        forkguard.protect(parent_end.fileno())
        worker.reader, worker.writer = await wire.open_pipe(parent_end, trusted=False, max_size=self._max_size)
        worker.reader.on_data = worker.heard
        worker.reader.after = self._events.taken
        self._background(self._watch(worker, parent_end.fileno()), f"watch-{worker.index}")
        if self.closed:                  # stop() ran while it was starting
            worker.kill("the engine closed")
            return
        worker.send(Init(self._settings()))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                hello = await wire.read(worker.reader)
                # ready once it asked for its first runs: a query waiting for it is sent at once
                credit = await wire.read(worker.reader)
            if type(hello) is not Ready or type(credit) is not Credit:
                raise ValueError(f"unexpected first messages {type(hello).__name__}, {type(credit).__name__}")
            worker.granted, worker.received = credit
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, this worker is not usable
            log.error("source %s: worker %d did not start: %s", self.source_name, worker.index, type(exc).__name__)
            worker.kill("it did not start")
            return
        worker.state = WorkerState.READY
        worker.became_ready = True
        self._failed_starts = 0
        worker.idle_since = worker.last_heard = time.monotonic()
        worker.reader_task = self._background(self._read(worker), f"read-{worker.index}")
        log.debug("source %s: worker %d ready (pid %s)", self.source_name, worker.index, hello.pid)
        self._events.worker_ready(worker)
        self._plan_retire()

    # ---- watching ----------------------------------------------------------------------------------
    async def _read(self, worker: WorkerHandle) -> None:
        """Everything a worker says, in the order it said it: each message goes to events.take, as it
        arrives while this task waits (wire.Reader's handler) or from here; what take() leaves goes to
        take_later, here. One handler, one failure rule: a message it cannot handle ends the worker."""
        reader = worker.reader
        assert reader is not None
        events = self._events
        broken = False

        def take(message: Any) -> bool:
            nonlocal broken
            try:
                return events.take(worker, message)
            except Exception as exc:   # noqa: BLE001 - the worker cannot be trusted any more
                broken = True
                reader.handler = None
                self._broke(worker, exc)
                return True

        while not broken:
            reader.handler = take
            try:
                message = await wire.read(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            except Exception as exc:   # noqa: BLE001 - a garbled or oversized frame
                self._broke(worker, exc)
                return
            finally:
                reader.handler = None
            if broken or take(message):
                continue
            try:
                await events.take_later(worker, message)
            except Exception as exc:   # noqa: BLE001
                self._broke(worker, exc)
                return

    def _broke(self, worker: WorkerHandle, exc: Exception) -> None:
        log.error("source %s: worker %d broke the protocol (%s: %s); replacing it", self.source_name,
                  worker.index, type(exc).__name__, str(exc)[:200])
        worker.kill(f"protocol violation: it sent a malformed message ({type(exc).__name__})")

    async def _watch(self, worker: WorkerHandle, fd: int) -> None:
        """Wait for the worker's end: read what it said last, fail its queries, replace it."""
        assert worker.proc is not None
        returncode = await worker.proc.wait()
        if worker.state is not WorkerState.DEAD:
            worker.state = WorkerState.STOPPING      # no new queries while its last words are read
        if worker.reader_task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(worker.reader_task), LAST_WORDS)
            worker.reader_task.cancel()
        worker.state = WorkerState.DEAD
        forkguard.release(fd)
        if worker.writer is not None:
            worker.writer.close()
        what = describe_exit(returncode, killed_by_us=worker.kill_reason is not None)
        if worker.kill_reason:
            what = f"{what}; {worker.kill_reason}"
        if not self.closed:
            level = logging.DEBUG if worker.kill_reason and not worker.inflight else logging.WARNING
            log.log(level, "source %s: worker %d ended (%s) with %d queries running; replacing it",
                    self.source_name, worker.index, what, len(worker.inflight))
        self._ended(worker, what)

    def _ended(self, worker: WorkerHandle, why: str) -> None:
        """The one place a worker's end is handled: its queries fail (worker_ended), and scale() starts what
        is now missing: below minWorkers, or for queries that wait."""
        worker.state = WorkerState.DEAD
        with contextlib.suppress(ValueError):
            self.workers.remove(worker)
        hits, misses = self.retired_cache_counts
        self.retired_cache_counts = (hits + worker.cache_counts[0], misses + worker.cache_counts[1])
        if not worker.kill_reason or not worker.kill_reason.startswith("idle"):
            self.restarts += 1
        if not worker.became_ready and not self.closed:
            self._failed_starts += 1
        self._events.worker_ended(worker, why)      # may ask scale() for the queries that wait
        if self.closed:
            return
        if self._failed_starts and not any(w.state is WorkerState.READY for w in self.workers):
            self._events.no_worker_starts(why)
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
        if worker.state is WorkerState.RETIRING:
            self._stop_if_idle(worker)
            return
        if worker.state is not WorkerState.READY and worker.state is not WorkerState.DRAINING:
            return
        if not worker.load:
            worker.idle_since = time.monotonic()
            if len(self.workers) > self.scale_policy.min_workers:     # else nothing is spare to retire
                self._plan_retire()
        budget = worker.budget
        if not budget.limited:
            budget.queries += 1
            return
        policy = self.recycle_policy
        memory = recycle.resident_bytes(worker.proc.pid) if policy.watches_memory and worker.proc else None
        reason = budget.after_query(memory)
        if reason is None:
            return
        self.recycles[reason.value] = self.recycles.get(reason.value, 0) + 1
        log.info("source %s: recycling worker %d (%s: %d queries, %s MiB resident)", self.source_name,
                 worker.index, reason.value, worker.budget.queries, "?" if memory is None else memory >> 20)
        worker.state = WorkerState.RETIRING
        worker.kill_reason = f"recycled ({reason.value})"     # its end is expected: no warning
        self._stop_if_idle(worker)

    def _stop_if_idle(self, worker: WorkerHandle) -> None:
        if worker.inflight or worker.reserved:
            return
        worker.send(Stop())

        def kill_if_still_there() -> None:
            if worker.alive and worker.proc is not None and worker.proc.returncode is None:
                worker.kill("it did not stop after it was recycled")

        asyncio.get_running_loop().call_later(STOP_GRACE, kill_if_still_there)

    def _supervised(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.state in _SUPERVISED]

    # ---- stopping ----------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Ask every worker to exit, kill those that do not within STOP_GRACE, and reap them all."""
        self.closed = True
        self._closing.set()
        if self._retire_timer is not None:
            self._retire_timer.cancel()
            self._retire_timer = None
        self.broadcast(Stop())
        if self._starting:
            await asyncio.wait(set(self._starting), timeout=2 * STOP_GRACE)
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        if procs:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=STOP_GRACE)
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
        for worker in self.workers:
            if worker.writer is not None:
                worker.writer.close()
        await self.launcher.close()       # the zygote stops with its last pool
        self.started.set()


# Live workers (counted against `workers`) are those starting or ready. A draining worker is not counted:
# it holds a query past its timeout and is killed unless it lets go within KILL_GRACE, and the next query
# should not wait for that (it may run `workers` + 1 meanwhile).
_READY, _STARTING = WorkerState.READY, WorkerState.STARTING
_SUPERVISED = frozenset({WorkerState.READY, WorkerState.DRAINING, WorkerState.RETIRING})


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


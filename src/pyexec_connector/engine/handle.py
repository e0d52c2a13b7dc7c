"""The connector's end of one worker process (engine/worker.py is the other): its state, its pipe (a
WorkerChannel driven by a PipeProtocol, engine/channel.py), its handshake, and each read's messages, in
order, to what serves it (the engine's Intake, engine/intake.py). The pool (pool.py) starts, supervises
and ends handles; the engine (process.py) gives them runs."""
from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import logging
import operator
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Callable, Container
from typing import Any

from .channel import PipeProtocol, WorkerChannel
from .launch import WorkerProcess
from .messages import Credit, Ping, Ready
from .recycle import RecyclePolicy, WorkerBudget

log = logging.getLogger("pyexec_connector.engine.process")


class WorkerState(enum.Enum):
    STARTING = "starting"      # spawned (or waiting to be, after failed starts); not ready yet
    READY = "ready"            # takes queries
    DRAINING = "draining"      # told to stop a query it has not let go of: takes nothing new
    RETIRING = "retiring"      # recycled (maxQueriesPerWorker, maxWorkerMemoryMB): finishes its queries, then stops
    STOPPING = "stopping"      # asked to exit, or killed; its end is being watched
    DEAD = "dead"              # ended; a fresh handle replaces it


_S = WorkerState
_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    _S.STARTING: frozenset({_S.READY, _S.STOPPING, _S.DEAD}),
    _S.READY: frozenset({_S.DRAINING, _S.RETIRING, _S.STOPPING, _S.DEAD}),
    _S.DRAINING: frozenset({_S.READY, _S.RETIRING, _S.STOPPING, _S.DEAD}),
    _S.RETIRING: frozenset({_S.STOPPING, _S.DEAD}),
    _S.STOPPING: frozenset({_S.DEAD}),
    _S.DEAD: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A worker asked into a state it cannot reach from its own (a bug in the pool)."""


# Seconds a worker's turn (from its runs' write to its answer) may take for the dispatcher to hold more
# runs for it than an idle worker's share: quick runs go to one worker in batches; a worker whose turn
# passes it gets no more until it answers, and what was held for it meanwhile goes to whoever is free.
# Far below any timeout; above a loop turn of a few dozen quick runs and a scheduler time slice on a busy
# machine (a turn is timed on this side: the connector's own delay in reading the answer counts).
PACE = 0.005

TakeMessages = Callable[["WorkerHandle", list[Any]], None]
"""What takes a ready worker's messages (ProcessEngine's intake): each read's, in order, as they arrive.
Raising means the worker broke the protocol: it is killed."""


class WorkerHandle:
    """One worker: what it runs (`inflight`, the engine's records), its pipe, and its liveness figures."""

    def __init__(self, index: int, restarts: int = 0, budget: WorkerBudget | None = None,
                 max_size: int | None = None):
        self.index = index
        self.budget = budget or RecyclePolicy().budget()     # queries it may still run before it is recycled
        self._state = WorkerState.STARTING
        self.proc: WorkerProcess | None = None     # forked or spawned; its signals go to its process group
        self.fd: int | None = None              # our end of its socket (forkguard-protected)
        self.exited = False                     # its process ended (WorkerPool reaps it)
        self.exit_code: int | None = None
        self.channel = WorkerChannel(max_size)
        self.pipe: PipeProtocol | None = None
        self.peer: socket.socket | None = None      # a copy of the worker's end of its socket (see _unread_bytes)
        self.inflight: dict[int, Any] = {}      # qid -> the engine's record of a query it runs
        self.reserved = 0                       # credit promised to parsed queries that have not resumed yet
        self.replied = 0                        # queries in `inflight` whose code sent its terminal reply
        self.cancelling: set[int] = set()       # queries told to stop (state DRAINING until it lets go)
        self.kill_reason: str | None = None
        self.restarts = restarts                # deaths in a row before becoming ready (restart backoff)
        self.became_ready = False
        self.backing_off = False                # waiting to start again after failed starts
        self.cache_counts = (0, 0)              # its code cache's hits and misses, as it last reported them
        self.stalled = False                    # did not read a run in time: sent nothing until it writes
        self.awaiting = False                   # sent runs, and has not written since (see flush)
        self.awaiting_since = 0.0               # when it was written runs while not awaiting
        self.last_turn = 0.0                    # seconds from its last runs' write to its answer
        self.over_pace = False                  # runs were held for it past a slow turn: QueryBook.spill moves them
        self.pace_check: asyncio.TimerHandle | None = None  # QueryBook's look at its turn, PACE after it began
        self.last_heard = time.monotonic()      # liveness: when it last wrote anything
        self.pinged_at: float | None = None     # the ping it has not answered yet
        self.idle_since = time.monotonic()      # when it last had no query (scaling: retired after idle)
        self.hello: asyncio.Future[Any] | None = None   # its Ready, once it also asked for runs
        self._ready: Ready | None = None
        self._take: TakeMessages | None = None  # who takes its messages once it is ready (serve)
        self._early: list[Any] = []             # what it said after its handshake, before serve()
        self.backlog: deque[Any] = deque()      # its messages that wait (the intake's), its reading paused
        self.backlog_task: asyncio.Task | None = None   # the intake's task taking them
        self.broken: Exception | None = None    # what it sent that broke the protocol

    # read several times per query (dispatch, recycling): a property whose getter is C code, not a Python call
    state: WorkerState = property(operator.attrgetter("_state"))  # type: ignore[assignment]

    def become(self, state: WorkerState) -> None:
        """The one way a worker's state changes (WorkerPool's); raises InvalidTransition for one not allowed."""
        if state is not self._state:
            if state not in _ALLOWED[self._state]:
                raise InvalidTransition(f"worker {self.index}: {self._state.value} -> {state.value}")
            self._state = state

    @property
    def load(self) -> int:
        return len(self.inflight) + self.reserved

    @property
    def credit(self) -> int:
        """Runs it may be sent now: asked for, not sent, not promised to a parsed query."""
        return self.channel.credit - self.reserved

    def takes(self, per_worker: int) -> int:
        """Its load, when it may be sent one more run now (ready, not stalled, with credit, holding fewer
        than `per_worker` queries, and fewer than maxQueriesPerWorker lets it still finish); else -1. One
        call per worker per dispatch decision: properties (state, load, credit) read apart cost as much again."""
        if self._state is not _S.READY or self.stalled:
            return -1
        reserved = self.reserved
        load = len(self.inflight) + reserved
        channel = self.channel
        if load >= per_worker or channel.granted - channel.sent - reserved <= 0:
            return -1
        budget = self.budget        # maxQueriesPerWorker: no more runs than it may still finish
        if budget.limited and budget.query_limit and budget.queries + load >= budget.query_limit:
            return -1
        return load

    def keeps_pace(self, now: float) -> bool:
        """Whether its last turn took less than PACE and the one running now has not passed it: the
        dispatcher may then hold more runs for it than an idle worker's share (one process's loop takes
        a batch of quick runs at a fraction of the cost of waking two)."""
        return self.last_turn < PACE and not (self.awaiting and now - self.awaiting_since >= PACE)

    @property
    def alive(self) -> bool:
        return self.state is not WorkerState.DEAD

    # ---- writing ---------------------------------------------------------------------------------
    def send(self, message: Any) -> None:
        """Write the message now (after any runs queued: order is kept)."""
        self.channel.send(message)
        self.flush(now=True)

    def flush(self, now: bool = False) -> None:
        """Write what is queued. Runs for a worker that has not written since it was last sent runs wait
        until it does (heard): it says what it read after every read, so under load the runs that came
        meanwhile go in one write, and an idle worker gets its run at once. Held runs keep their take_by:
        a worker that never writes again has them taken back (overdue)."""
        if self.awaiting and not now:
            return
        channel = self.channel
        runs = channel.runs_queued
        data = channel.data_to_send()
        transport = self.pipe.transport if self.pipe is not None else None
        if data and transport is not None and not transport.is_closing():
            transport.write(data)      # else it is dying: its watcher fails its queries
            if runs and not self.awaiting:
                self.awaiting = True
                self.awaiting_since = time.monotonic()

    def ping(self) -> None:
        self.pinged_at = time.monotonic()
        self.send(Ping())

    def overdue(self, now: float, running: Container[int]) -> list[int]:
        """The runs it did not read by their take_by (WorkerChannel.overdue): taken back, and it is stalled
        until it writes again."""
        self.flush(now=True)
        late = self.channel.overdue(now, running, self._unread_bytes)
        if late:
            self.stalled = True
        return late

    def _unread_bytes(self) -> int:
        """Bytes written to the worker it has not read: in the transport's buffer, and in its end's receive
        queue (FIONREAD on our copy of that end: exact, where SIOCOUTQ on ours counts buffer overheads).
        When that cannot be told, none: a run is then never taken back (it could run twice), and only
        the liveness ping finds a blocked worker."""
        transport = self.pipe.transport if self.pipe is not None else None
        if transport is None or self.peer is None:
            return 0
        try:
            queued = struct.unpack("i", fcntl.ioctl(self.peer.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            return 0
        return transport.get_write_buffer_size() + queued

    def ended(self) -> None:
        """Its process ended: our copy of its end goes (else its pipe would never reach its end of file)."""
        if self.peer is not None:
            self.peer.close()
            self.peer = None

    def kill(self, reason: str) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.kill_reason = self.kill_reason or reason
            if self._state is not WorkerState.DEAD:
                self.become(WorkerState.STOPPING)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def close(self) -> None:
        self.ended()
        if self.pace_check is not None:
            self.pace_check.cancel()
            self.pace_check = None
        if self.pipe is not None and self.pipe.transport is not None:
            self.pipe.transport.close()
        if self.backlog_task is not None:
            self.backlog_task.cancel()

    # ---- reading ---------------------------------------------------------------------------------
    async def connect(self, sock: Any) -> None:
        """Its socket, read from now on by a PipeProtocol."""
        loop = asyncio.get_running_loop()
        self.hello = loop.create_future()
        pipe = self.pipe = PipeProtocol(self.channel, self._arrived, self.broke)
        pipe.closed.add_done_callback(self._closed)
        await loop.create_connection(lambda: pipe, sock=sock)

    def _closed(self, _: asyncio.Future[None]) -> None:
        if self.hello is not None and not self.hello.done():
            self.hello.set_exception(ConnectionError("its pipe closed before it was ready"))

    async def handshake(self, init: Any, timeout: float) -> Ready:
        """Send its Init; its Ready, once it also asked for runs (raises what went wrong, TimeoutError)."""
        assert self.hello is not None
        self.send(init)
        async with asyncio.timeout(timeout):
            return await asyncio.shield(self.hello)

    async def last_words(self, timeout: float) -> None:
        """After its process ended: what it wrote last, read and taken (at most `timeout` seconds)."""
        if self.pipe is None or not self.became_ready:
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.pipe.closed)
                if self.backlog_task is not None:
                    await asyncio.shield(self.backlog_task)

    def serve(self, take: TakeMessages) -> None:
        """Ready: what it says goes to `take` from now on (what it said since its handshake first)."""
        self._take = take
        early, self._early = self._early, []
        if early:
            self._arrived(early, heard=False)

    def heard(self) -> None:
        """The worker wrote something: its loop runs. The runs held for it go out now, unless the turn it
        just ended took longer than PACE (over_pace: the engine gives them to whoever is free, see
        QueryBook.spill): a slow turn's runs are not followed by a batch held meanwhile."""
        now = self.last_heard = time.monotonic()
        self.pinged_at = None
        self.stalled = False
        if self.awaiting:
            self.awaiting = False
            self.last_turn = now - self.awaiting_since
            if self.channel.runs_queued:    # (anything else queued while it was awaited went out at once)
                if self.last_turn < PACE:
                    self.flush()
                else:
                    self.over_pace = True

    def broke(self, exc: Exception) -> None:
        """It sent what this side does not accept (its channel's, or the intake's verdict): it is killed."""
        if self.broken is not None:
            return
        self.broken = exc
        if self.hello is not None and not self.hello.done():
            self.hello.set_exception(exc)
        log.error("worker %d broke the protocol (%s: %s); replacing it", self.index, type(exc).__name__,
                  str(exc)[:200])
        self.kill(f"protocol violation: it sent a malformed message ({type(exc).__name__})")

    def _arrived(self, messages: list[Any], heard: bool = True) -> None:
        """What it said, in order: before it is ready, its Ready (and first credit); then each read's
        messages to the intake (`serve`)."""
        if heard:
            self.heard()
        if self.broken is not None:
            return
        take = self._take
        if take is None:
            self._starting(messages)
            return
        try:
            take(self, messages)
        except Exception as exc:   # noqa: BLE001 - the worker cannot be trusted any more
            self.broke(exc)

    def _starting(self, messages: list[Any]) -> None:
        hello = self.hello
        if hello is None:
            return
        if hello.done():        # ready, and not served yet: kept for serve()
            self._early.extend(messages)
            return
        for message in messages:      # Ready, then its first Credit (counted by the channel)
            kind = type(message)
            if kind is Ready and self._ready is None:
                self._ready = message
            elif kind is not Credit or self._ready is None:
                self.broke(ValueError(f"unexpected first message {kind.__name__}"))
                return
        if self._ready is not None and self.channel.granted:
            hello.set_result(self._ready)       # ready once it asked for runs: a waiting query goes at once

    def pause_reading(self) -> None:
        """Its messages wait (the intake's backlog): nothing more is read from it until resume_reading(),
        so its writes, and the code's awaited sends, wait too."""
        transport = self.pipe.transport if self.pipe is not None else None
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self.pipe.transport if self.pipe is not None else None
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

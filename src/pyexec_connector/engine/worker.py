"""A worker process: its own interpreter and asyncio loop, running queries the connector sends it.

Started by the process engine as `python -m pyexec_connector.engine.worker FD`, FD being its end of a
socket pair. `connector_connection` here is the ordinary ConnectorConnection whose frames travel over
that socket to the connector, which sends them out through the query's ReplyChannel or the link, in
the order the code sent them. Module-level state (sys.modules) lives as long as the worker."""
from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import sys
import time
from collections.abc import Coroutine
from typing import Any

from .. import errors, forkguard, protocol, sandbox, values
from ..cache import CodeCache
from ..connection import ConnectorConnection, Health
from ..errors import QueryError
from ..eventloop import event_loop_factory
from ..reply import ReplyChannel, notification_builder, oversize
from ..request import parse_query
from . import cgroup, output, procgroup, reaper, runtime, wire
from .base import Job, Outcome, reply_body
from .channel import WorkerEnd
from .guard import CodeGuard
from .messages import (
    ACCEPT_WINDOW,
    Accepted,
    Cancel,
    Cancelled,
    Configure,
    Declined,
    Done,
    Failed,
    HealthChanged,
    LinkFrame,
    Ping,
    ProcessesEnded,
    Ready,
    Relay,
    Reply,
    Run,
    Stop,
)

log = logging.getLogger("pyexec_connector.worker")

# Runs a worker asks for at a time beyond those it holds (docs/ENGINE.md, "Credit"): small, so that a run
# of synchronous code keeps few others waiting behind it in the worker; asked again once half is used,
# when the loop has nothing ready, so awaiting code still takes hundreds within milliseconds, and a
# batch of quick runs as large as the connector holds for one worker (handle.PACE) fits in what is left.
WINDOW = 64
DEFAULT_CAP = 500     # the source's queriesPerWorker, until Init says


class PipeChannel(ReplyChannel):
    """A query's replies as the code sends them: checked here (status, body, once-only), then passed to
    the connector, whose own channel for the query decides again (it may have answered with a timeout)."""

    # No __init__ of its own (one is made per query: ReplyChannel's runs alone, without a super() call):
    # `_send` is the worker's send (messages, not frames), and Worker._start sets `_qid`.
    __slots__ = ("_qid",)
    _qid: int

    def _deliver(self, frame: str, terminal: bool, status: int) -> None:
        self._send(_new(Reply, (self._qid, frame, terminal, status, self.error_code)))  # type: ignore[arg-type]


class Worker:
    def __init__(self, fd: int):
        self._fd = fd
        self._pipe: WorkerEnd | None = None
        self.runs: dict[int, asyncio.Task] = {}
        self.cancelled: set[int] = set()      # runs the connector told to stop
        self.cache = CodeCache()
        self.guard = CodeGuard(())
        self.max_message_bytes: int | None = None
        self.runtime_info = False         # the source's returnRuntimeInformation, for relayed queries
        self.health = Health()
        self.rich_results = False         # the source's resultValues is "rich", for relayed queries
        self._batch: list[bytes] = []     # ends of runs in this loop iteration, written together
        self._owe_ack = False             # pinged, and has not written since (see messages.Ack)
        self.cap = DEFAULT_CAP            # queriesPerWorker: the most runs held at once
        self.granted = 0                  # runs asked for over its life (messages.Credit)
        self.received = 0                 # runs read over its life
        self._reported = 0                # `received` as the last Credit said
        self._idle_soon = False           # _idle is scheduled
        self._tasks_started = False       # runs that became tasks since _idle last ran
        self._reading = False             # taking what one read brought (see _taken)
        self._stopping = False
        self._frame_limit = 2 ** 63           # the longest frame the connector accepts (set by Init)
        self.unaccepted = 0                   # link frames' characters sent, not Accepted yet
        self._room: asyncio.Event | None = None     # set when unaccepted falls to ACCEPT_WINDOW
        self.send_waits = 0                   # awaited sends that waited for the connector's Accepted
        self.processes = reaper.QueryProcesses()    # what queries start ends with them (issue 21)

    # ---- writing ---------------------------------------------------------------------------------
    def send(self, message: Any) -> None:
        """Write the message now (after any batched ones: order is kept). Frames the code sends go out
        at once, even if the code then blocks."""
        self._batch.append(self._encode(message))
        self.flush()

    def send_soon(self, message: Any) -> None:
        """Write at the end of this loop iteration, with the other runs that end in it: one write."""
        self._batch.append(self._encode(message))
        if not self._reading:       # else _taken writes it at the end of the read
            self._soon()

    def _soon(self) -> None:
        if not self._idle_soon:
            self._idle_soon = True
            asyncio.get_running_loop().call_soon(self._idle)

    def _idle(self) -> None:
        """After the callbacks ready when it was scheduled: what ended goes out; and once the runs started
        meanwhile had their first step too (one more turn), credit is asked for if the window runs low.
        A run in synchronous code holds the loop, so this waits for it: a busy worker asks for nothing."""
        self._idle_soon = False
        tasks_started, self._tasks_started = self._tasks_started, False
        self._turned(tasks_started)

    def _taken(self) -> None:
        """What arrived in one read was taken (its synchronous runs ran): their ends and the credit go out
        in one write, now, unless runs became tasks (then credit waits for their first steps: _idle)."""
        self._reading = False
        self._turned(self._tasks_started)

    def _turned(self, tasks_started: bool) -> None:
        if tasks_started:
            self.flush()
            self._soon()
        else:
            self._grant()
            self.flush()
        # what ended runs left running ends a moment later (issue 21), off every reply's path, in one sweep
        if self.processes.ended_runs and self.processes.due is None:
            self.processes.due = asyncio.get_running_loop().call_later(reaper.SWEEP_DELAY, _sweep, self)

    def _grant(self) -> None:
        """Credit back up to the window once half is used; `received` said too while runs read since still run
        (a run's end tells the connector its loop took them: dispatch.py). Sent with the runs' ends, no write."""
        room = self.cap - len(self.runs)
        window = WINDOW if room > WINDOW else room
        more = window - (self.granted - self.received)
        if more > 0 and more * 2 >= window:
            self.granted += more
        elif self.received == self._reported or not self.runs:
            return
        self._reported = self.received
        self._batch.append(wire.encode_credit(self.granted, self.received))

    def _encode(self, message: Any) -> bytes:
        """The message's frame; one the connector would refuse as too long becomes the error it means."""
        forkguard.check()
        data = wire.encode(message)
        if len(data) > self._frame_limit and self.max_message_bytes is not None:
            data = wire.encode(_within_limit(message, len(data), self.max_message_bytes))
        kind = type(message)
        if kind is Reply or kind is LinkFrame:
            self.unaccepted += len(message.frame)
        return data

    def flush(self) -> None:
        """Write what is batched; after a Ping, at least an Ack (liveness)."""
        batch = self._batch
        if self._owe_ack:
            self._owe_ack = False
            if not batch:
                batch.append(wire.ACK)
        pipe = self._pipe
        if batch and pipe is not None and pipe.transport is not None:
            data = b"".join(batch) if len(batch) > 1 else batch[0]
            batch.clear()
            pipe.transport.write(data)

    def send_frame(self, frame: str) -> None:
        self.send(LinkFrame(frame))

    async def drained(self) -> None:
        """What the code's awaited sends wait for: the pipe written, and the connector having accepted all
        but ACCEPT_WINDOW of the link frames into the link's outbox (it does so only while that has room).
        Bounded by the connector: if it goes, this process ends."""
        self.flush()
        if self._pipe is not None:
            await self._pipe.drain()
        if self.unaccepted > ACCEPT_WINDOW:
            self.send_waits += 1
            while self.unaccepted > ACCEPT_WINDOW:
                if self._room is None:
                    self._room = asyncio.Event()
                await self._room.wait()

    # ---- reading ---------------------------------------------------------------------------------
    async def serve(self) -> None:
        forkguard.arm()
        forkguard.protect(self._fd)
        sock = socket.socket(fileno=self._fd)
        pipe = self._pipe = WorkerEnd()
        await asyncio.get_running_loop().create_connection(lambda: pipe, sock=sock)
        try:
            init = await pipe.first
        except ConnectionError:
            return                         # the connector is gone
        settings = init.settings
        self._configure(settings["cache_capacity"], settings["forbid"], settings.get("runtime_info", False),
                        settings.get("rich_results", False))
        source = settings["source_name"]
        self.health.declared = settings["healthy"]

        async def report_health(healthy: bool) -> None:
            self.send(HealthChanged(healthy))

        self.health.listeners.append(report_health)
        self.max_message_bytes = settings.get("max_message_bytes")
        if self.max_message_bytes is not None:
            self._frame_limit = wire.frame_limit(self.max_message_bytes) + 4     # with its length prefix
        self.connection = ConnectorConnection(source, self.send_frame, self.drained,
                                              notification_builder(source, self.max_message_bytes),
                                              settings["server_config"], self.health)
        self.source_name = source
        self.processes.keep = bool(settings.get("keep_child_processes", False))
        runtime.install_task_tracking(asyncio.get_running_loop())
        output.install()
        _limit_memory(settings["memory_limit_mb"])
        sandbox.apply_limits(settings.get("max_open_files"), settings.get("max_processes"))
        self.cap = settings.get("queries_per_worker") or DEFAULT_CAP
        self._batch.append(wire.encode(Ready(os.getpid())))
        self._grant()
        self.flush()
        # each chunk's messages taken as they arrive; their ends (or Ack) go out without a loop iteration
        pipe.serve(self.take, self._taken)
        await pipe.ended                   # Stop, or the connector is gone

    def take(self, message: Any) -> bool:
        """Every message from the connector, as it arrives (channel.WorkerEnd); False: stop."""
        forkguard.check()
        self._reading = True
        kind = type(message)
        if kind is Relay or kind is Run:
            # the clock is read after the bytes were: a run read after take_by is one the connector took back
            self.received += 1
            if time.monotonic() > message.take_by:
                self.send_soon(Declined(message.qid))
            elif kind is Relay:
                self._relay(message)
            else:
                self._start(message.qid, message.job, message.reply_address)
        elif kind is Ping:
            self._owe_ack = True
        elif kind is Accepted:
            self.unaccepted -= message.size
            room = self._room
            if room is not None and self.unaccepted <= ACCEPT_WINDOW:
                self._room = None
                room.set()
        elif kind is Cancel:
            task = self.runs.get(message.qid)
            if task is not None:
                self.cancelled.add(message.qid)
                task.cancel()
        elif kind is HealthChanged:
            self.health.declared = message.healthy
        elif kind is Configure:
            self._configure(*message[:4])
            if message.queries_per_worker is not None:
                self.cap = message.queries_per_worker
                self._soon()
        elif kind is Stop:
            self.flush()
            self._stopping = True
            return False
        return True

    def _configure(self, cache_capacity: int, forbid: tuple[str, ...], runtime_info: bool = False,
                   rich_results: bool = False) -> None:
        self.runtime_info = runtime_info
        self.rich_results = rich_results
        old = self.cache
        self.cache = CodeCache(cache_capacity)
        self.cache.hits, self.cache.misses = old.hits, old.misses     # counters over the worker's life
        self.guard = CodeGuard(forbid)

    # ---- running ---------------------------------------------------------------------------------
    def _relay(self, message: Relay) -> None:
        """A query frame the connector relayed as it came: its WITH clause is read here."""
        qid = message.qid
        try:
            # strict: a relayed frame never holds `script` (the connector keeps those: it knows strictParameters
            # and logs the lenient reading); should one ever get through, it is refused, not run unsaid.
            request = parse_query(protocol.loads(message.raw).get("object"), strict=True)
        except QueryError as exc:
            self.send_soon(Failed(qid, exc, _counts(self.cache), refused=True))
            return
        except Exception as exc:    # noqa: BLE001 - the connector parsed this frame: should not happen
            self.send_soon(Failed(qid, QueryError(errors.BAD_QUERY, "The query frame could not be read: {0}",
                                                  [f"{type(exc).__name__}: {exc}"]), _counts(self.cache),
                                  refused=True))
            return
        code = request.code if message.text is None else message.text
        self._start(qid, Job(request, code, code, self.runtime_info, None, self.rich_results), message.reply_address)

    def _start(self, qid: int, job: Job, reply_address: str) -> None:
        """Run the query at once when its code cannot await (no task), else in a task of its own; either way
        in a context of its own, so that the context variables the code sets do not outlive the query."""
        channel = PipeChannel(self.send, reply_address, self.source_name, self.max_message_bytes)
        channel._qid = qid
        context = contextvars.copy_context()
        try:
            started = context.run(runtime.start_job, self.cache, job, self.connection, channel, self.guard)
        except Exception as exc:    # noqa: BLE001 - reported as the task reports it
            self._ended(qid, reply_address, exc)
            return
        except BaseException as exc:    # noqa: BLE001 - CancelledError, GeneratorExit raised by the code itself
            self._ended(qid, reply_address, runtime.execution_error(exc))
            return
        if isinstance(started, Outcome):
            self._ended(qid, reply_address, None, started)
        else:
            self.runs[qid] = asyncio.create_task(self._run(qid, started, reply_address), context=context)
            self.processes.started(qid)     # before its first step: nothing of it has run yet
            self._tasks_started = True

    async def _run(self, qid: int, running: Coroutine[Any, Any, Outcome], reply_address: str) -> None:
        try:
            outcome = await running
        except BaseException as exc:    # noqa: BLE001 - reported below
            self._ended(qid, reply_address, exc)
        else:
            self._ended(qid, reply_address, None, outcome)
        finally:
            self.runs.pop(qid, None)
            self.cancelled.discard(qid)
            self._soon()

    def _ended(self, qid: int, reply_address: str, exc: BaseException | None, outcome: Outcome | None = None) -> None:
        """The one message that ends a run: Answered, Done, Failed or Cancelled. What the run left running
        ends at the sweep its turn's end schedules (_turned, after _taken or _idle)."""
        self.processes.ended(qid, reply_address)
        if exc is None:
            assert outcome is not None
            if outcome.runtime is None and outcome.output is None and outcome.dry_run is None \
                    and outcome.results_json is not None:
                # the whole reply, built here: the connector only puts it in the link's outbox
                frame = protocol.reply_frame_raw(reply_address, protocol.STATUS_COMPLETE, reply_body(outcome, 0.0))
                if not oversize(frame, self.max_message_bytes):
                    # send_soon without _encode: within maxMessageBytes, an Answered is within the pipe's limit
                    forkguard.check()
                    self._batch.append(wire.encode_answered(qid, frame, self.cache.hits, self.cache.misses))
                    if not self._reading:
                        self._soon()
                    return
            self.send_soon(Done(qid, outcome.results_json, outcome.runtime, outcome.output, outcome.dry_run,
                                _counts(self.cache)))
        elif isinstance(exc, asyncio.CancelledError):
            if qid in self.cancelled:        # else the worker itself is ending: the connector hears of it
                self.send(Cancelled(qid))
        elif isinstance(exc, QueryError):
            self.send(Failed(qid, _sendable(exc), _counts(self.cache)))
        elif isinstance(exc, Exception):
            log.error("query %s failed inside the worker", reply_address, exc_info=exc)
            self.send(Failed(qid, QueryError(errors.INTERNAL_ERROR, "The worker failed while running the query: "
                                             "{0}", [f"{type(exc).__name__}: {exc}"]), _counts(self.cache)))
        else:
            raise exc


_new = tuple.__new__     # a NamedTuple without its Python-level __new__ (one per query)


def _sweep(worker: Worker) -> None:
    """What ended runs left running is ended (reaper.py), and each such run's query told of it."""
    for qid, reply_address, count in worker.processes.check() or ():
        worker.send(ProcessesEnded(qid, reply_address, count))


def _counts(cache: CodeCache) -> tuple[int, int]:
    """The code cache's hits and misses over the worker's life, as each run's end reports them."""
    return cache.hits, cache.misses


def _within_limit(message: Any, size: int, max_bytes: int) -> Any:
    """A message too long for the pipe (the connector would take it for a protocol violation): the run's
    end it stands for, as the error the connector would have answered with."""
    if type(message) is Done:
        return Failed(message.qid, QueryError(
            errors.TOO_LARGE, "The results are {0} bytes, over the connector's limit of {1} bytes "
                              "(maxMessageBytes); use limitReturnTo or codeHandlesReturn to send less.",
            [size, max_bytes]), message.cache_counts)
    if type(message) is Failed:
        log.warning("an error message of %d bytes was too large to send: %s", size, message.error.message()[:2000])
        return Failed(message.qid, QueryError(
            message.error.code, "The error message was {0} bytes, over maxMessageBytes ({1}); see the "
                                "connector's log.", [size, max_bytes]), message.cache_counts, message.refused)
    raise ValueError(f"a {type(message).__name__} of {size} bytes is over the pipe's limit")


def _sendable(error: QueryError) -> QueryError:
    """A QueryError whose parameters the connector can receive (plain data only) and encode: user code
    may raise it with numpy values, datetimes... (encoded here, as the connector would) or odd objects."""
    return QueryError(error.code, error.template, [_parameter(p) for p in error.params])


def _parameter(value: Any) -> Any:
    try:
        return values.to_data(value)
    except values.Unencodable:
        return repr(value)


def _limit_memory(megabytes: int | None) -> None:
    if not megabytes:
        return
    import resource
    limit = megabytes * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < limit:
        limit = hard
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _die_with_the_connector(connector_pid: int) -> None:
    """Linux: the kernel kills this worker when the connector ends, even by SIGKILL, even while user code
    spins in a loop that never reads the socket again."""
    try:
        import signal
        sandbox.libc().prctl(1, signal.SIGKILL, 0, 0, 0)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != connector_pid:            # it ended before the line above
        os._exit(1)


def main() -> None:
    cgroup.join()               # a spawned worker: into the connector's cgroup before it changes user
    sandbox.harden_worker()     # first: the worker user, no new privileges (before anything else runs)
    _die_with_the_connector(int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid())
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="pyexec-worker[%(process)d] %(levelname)s %(name)s: %(message)s")
    loop_factory, _ = event_loop_factory()      # uvloop when installed, as in the connector
    procgroup.become_subreaper()    # what its code starts stays under it, whatever session it moves to
    worker = Worker(int(sys.argv[1]))
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(worker.serve())
    finally:
        worker.processes.end_all()      # nothing its code started outlives it


if __name__ == "__main__":
    main()

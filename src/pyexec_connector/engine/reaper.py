"""What user code starts ends with its query, and nothing outlives its worker (docs/PROCESSES.md).

A worker is a child subreaper: whatever its code starts stays its descendant, also a process that changed
session or process group or whose parent exited (it is reparented to the worker, not to PID 1), so the
worker finds them all under /proc/<pid>/task/*/children. `QueryProcesses` ends them as queries end.

Which query a process belongs to cannot be told when queries overlap in one worker. The rule: a process
belongs to every query that was running when it started (its start time in /proc, to the clock tick: a
query that started up to one tick after the process may be counted among them); it ends when the last of
those has ended. A process that belongs to no running query ends when it is found. Every query ends (at
the latest at its timeout), so every process does. The worker checks once per turn of its loop in which
queries ended, after their replies went out: a query whose code cannot await starts and ends within one
turn, so a check never sees it running, and only queries that became tasks are recorded as running.

The zygote uses `kill_descendants` and `kill_orphans`: a worker's descendants are reparented to the
zygote (also a subreaper) when the worker ends, and the zygote kills them there.

Cost, for a query that starts no process: an entry in a list, and one waitid() per turn of the worker's
loop (for every query that ended in it), after their replies went out: the worker has no child at all,
so nothing is scanned. A query that becomes a task (it awaits) also costs a clock read at its start."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from .. import sandbox

GRACE = 1.0            # seconds between SIGTERM and SIGKILL for what a query left running
# seconds from a turn in which runs ended to the sweep for what they left running: one waitid() for all
# the runs that end meanwhile rather than one per turn (a turn per query when queries come one by one)
SWEEP_DELAY = 0.05
REAP_WITHIN = 5.0      # seconds the worker keeps trying to reap what it killed
_WALL = 0x40000000     # __WALL (linux/wait.h): children of any kind, also those cloned without SIGCHLD
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_FREEZE_ROUNDS = 50    # SIGSTOP sweeps before SIGKILL: each catches what forked during the one before
_clock = time.clock_gettime
_BOOT = time.CLOCK_BOOTTIME if hasattr(time, "CLOCK_BOOTTIME") else time.CLOCK_MONOTONIC  # /proc's start times


class Proc(NamedTuple):
    """A process, as /proc names it: its pid and start time (clock ticks since boot) together, since a
    pid alone may be reused once the process is reaped."""
    pid: int
    start: int


def has_children() -> bool:
    """Whether this process has any child, running or a zombie (one syscall, reaps nothing)."""
    try:
        os.waitid(os.P_ALL, 0, _WAITID_FLAGS)
    except ChildProcessError:
        return False
    except OSError:
        return True        # cannot tell: look
    return True


_WAITID_FLAGS = os.WEXITED | os.WNOHANG | os.WNOWAIT | _WALL


def _childless_probe() -> Callable[[], object]:
    """`not has_children()`, faster, for the end of every query: the C library's waitid() answers -1
    (ECHILD: truthy) or 0 without the exception os.waitid raises for ECHILD (half the cost). The portable
    one where that cannot be had or does not answer as expected."""
    try:
        waitid = sandbox.libc().waitid
        answer = waitid(os.P_ALL, 0, None, _WAITID_FLAGS)
    except (OSError, AttributeError):
        return lambda: not has_children()
    if answer == -1 and ctypes.get_errno() != errno.ECHILD:
        return lambda: not has_children()
    return functools.partial(waitid, os.P_ALL, 0, None, _WAITID_FLAGS)


def _stat(pid: int) -> tuple[int, bytes] | None:
    """(start time in ticks, state letter) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fp:
            stat = fp.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: the fields after it follow the last ")"
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[19]), fields[0]


def children_of(pid: int) -> list[int]:
    """The children of every thread of `pid` (a thread's fork is that thread's child)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as fp:
                found.extend(int(child) for child in fp.read().split())
        except OSError:
            continue
    return found


def descendants(pid: int, spare: Iterable[int] = ()) -> dict[Proc, bytes]:
    """Every descendant of `pid` with its state letter, except the children in `spare` and theirs."""
    spared = set(spare)
    found: dict[Proc, bytes] = {}
    seen: set[int] = set()
    todo = [child for child in children_of(pid) if child not in spared]
    while todo:
        child = todo.pop()
        if child in seen:
            continue
        seen.add(child)
        stat = _stat(child)
        if stat is None:
            continue
        found[Proc(child, stat[0])] = stat[1]
        todo.extend(children_of(child))
    return found


def send(proc: Proc, sig: int) -> bool:
    """Signal the process if it is still the one that was found (a pidfd pins it while its start time
    is checked). False when it is gone or not ours to signal."""
    fd = None
    with contextlib.suppress(OSError):
        fd = os.pidfd_open(proc.pid)
    try:
        stat = _stat(proc.pid)
        if stat is None or stat[0] != proc.start:
            return False
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(proc.pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if fd is not None:
            os.close(fd)


def kill_descendants(pid: int | None = None, spare: Iterable[int] = ()) -> int:
    """SIGKILL every descendant of `pid` (this process by default) but the children in `spare` and their
    own: stopped first, sweep after sweep, so that none forks between being found and being killed.
    Returns how many were killed. Their reaping is the caller's (they are its children, or soon will be:
    it is a subreaper)."""
    pid = os.getpid() if pid is None else pid
    spared = set(spare)
    stopped: set[Proc] = set()
    for _ in range(_FREEZE_ROUNDS):
        fresh = [p for p in descendants(pid, spared) if p not in stopped]
        if not fresh:
            break
        for proc in fresh:
            send(proc, signal.SIGSTOP)
        stopped.update(fresh)
    return sum(send(proc, signal.SIGKILL) for proc in stopped)


def kill_orphans(workers: Iterable[int]) -> int:
    """In the zygote: kill what workers that ended left behind (reparented here: every child that is not
    a live worker, and all below it). A live worker is a subreaper: what its code starts stays under it."""
    return kill_descendants(None, workers)


class QueryProcesses:
    """One worker's record of the processes its queries started, ending them as the queries end (see the
    module's rule). The worker calls started() for a run that becomes a task (one that can span turns of
    its loop: a run that ends within the turn it started in can own no process a sweep finds, since
    sweeps run between turns), ended() for every run, and check() SWEEP_DELAY after a turn in which
    runs ended (their replies went out then); end_all() as it ends. SIGKILL after the grace and the
    reaping run on the worker's event loop (timers). `keep` (keepChildProcesses): nothing ends before the
    worker does."""

    def __init__(self, keep: bool = False, pid: int | None = None):
        self.keep = keep
        self._pid = os.getpid() if pid is None else pid
        self._running: dict[int, float] = {}        # qid -> when it started (boot-time clock, seconds)
        self.ended_runs: list[tuple[int, str]] = []  # (qid, reply address) ended since the last check()
        self._held: dict[Proc, frozenset[int]] = {}  # process -> the running queries it belongs to
        self._ending: dict[Proc, float] = {}        # ended, not reaped yet -> when SIGKILL is due (monotonic)
        self._killed: dict[Proc, float] = {}        # sent SIGKILL -> until when it is waited for
        self._timer: asyncio.TimerHandle | None = None
        self._childless = _childless_probe()
        self.due: asyncio.TimerHandle | None = None  # the worker's sweep, scheduled (Worker._turned)

    def started(self, qid: int) -> None:
        """A run became a task: it may still run when a later sweep finds what another run started."""
        if not self.keep:
            self._running[qid] = _clock(_BOOT)

    def ended(self, qid: int, reply_address: str) -> None:
        """A run ended: what it leaves running is ended by the next check()."""
        if not self.keep:
            self._running.pop(qid, None)
            self.ended_runs.append((qid, reply_address))

    def check(self) -> list[tuple[int, str, int]] | None:
        """After the runs that ended since the last check (`ended_runs`, not empty): SIGTERM to every
        process that belonged to one of them and to no run still going (SIGKILL follows after GRACE). One
        syscall when the worker has no child at all (nothing to scan). Returns (qid, reply address,
        processes running) for each run that left processes running; one found for the first time is
        counted against the last run that ended. (keep: nothing is recorded, so this is never called.)"""
        self.due = None
        ended = self.ended_runs
        if not ended:
            return None
        if self._childless():
            ended.clear()
            return None
        self.ended_runs = []
        return self._sweep(ended)

    def _sweep(self, ended: list[tuple[int, str]]) -> list[tuple[int, str, int]]:
        found = descendants(self._pid)
        due: list[tuple[Proc, int]] = []         # with the position in `ended` of the run it is counted against
        held: dict[Proc, frozenset[int]] = {}
        last = len(ended) - 1
        for proc in found:
            if proc in self._ending or proc in self._killed:
                continue
            owners = self._held.get(proc)
            if owners is None:
                started = (proc.start + 1) / _TICKS      # to the tick: a query up to one tick later is given it
                owners = frozenset(q for q, began in self._running.items() if began <= started)
                blame = last
            else:
                blame = max((i for i, (qid, _) in enumerate(ended) if qid in owners), default=last)
                owners = frozenset(q for q in owners if q in self._running)
            if owners:
                held[proc] = owners
            else:
                due.append((proc, blame))
        self._held = held
        counts = [0] * len(ended)
        kill_at = time.monotonic() + GRACE
        for proc, blame in due:
            self._ending[proc] = kill_at
            if found[proc] != b"Z" and send(proc, signal.SIGTERM):
                counts[blame] += 1
        if due:
            self._schedule(0.0 if not any(counts) else GRACE)
        return [(qid, address, count) for (qid, address), count in zip(ended, counts, strict=True) if count]

    def _schedule(self, delay: float) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._step)

    def _step(self) -> None:
        self._timer = None
        delay = self.finish()
        if delay is not None:
            self._schedule(delay)

    def finish(self) -> float | None:
        """SIGKILL what is due and did not end on SIGTERM, with whatever it started since (stopped first),
        and reap what exited. Returns the seconds until there is more to do, None when nothing is left."""
        now = time.monotonic()
        due = {p for p, when in self._ending.items() if when <= now}
        if due:
            for proc in due:
                del self._ending[proc]
            for proc in self._freeze(due):
                if send(proc, signal.SIGKILL) or proc in due:
                    self._killed[proc] = now + REAP_WITHIN
        self.reap()
        for proc in [p for p, until in self._killed.items() if until <= now]:
            del self._killed[proc]          # not reaped in time: a later sweep finds it again
        if self._killed or any(_exited(p) for p in self._ending):
            return 0.02
        if self._ending:
            return max(0.0, min(self._ending.values()) - now)
        return None

    def _freeze(self, roots: set[Proc]) -> set[Proc]:
        """The roots and everything under them that no running query holds, SIGSTOPped sweep after sweep
        until none forks any more."""
        stopped: set[Proc] = set()
        fresh = {p for p in roots if _stat(p.pid) is not None}
        for _ in range(_FREEZE_ROUNDS):
            if not fresh:
                break
            for proc in fresh:
                send(proc, signal.SIGSTOP)
            stopped |= fresh
            fresh = {p for root in stopped for p in descendants(root.pid) if p not in stopped and p not in self._held}
        return stopped

    def reap(self) -> bool:
        """Reap what was ended and has exited; True while some of it is not reaped yet. Only these pids are
        waited for: a child the code still waits for itself (its Popen) is never taken from it."""
        for table in (self._ending, self._killed):
            for proc in list(table):
                try:
                    pid, _ = os.waitpid(proc.pid, os.WNOHANG)
                except ChildProcessError:
                    stat = _stat(proc.pid)      # not (or not yet) this worker's child: its parent reaps it
                    if stat is None or stat[0] != proc.start:
                        del table[proc]
                    continue
                if pid:
                    del table[proc]
        return bool(self._ending or self._killed)

    def end_all(self, grace: float = GRACE) -> int:
        """The worker is ending: SIGTERM to everything under it, SIGKILL after `grace`, reaped (bounded).
        Synchronous: the worker's loop is closed. Returns how many were running."""
        if self._timer is not None:
            with contextlib.suppress(RuntimeError):     # its loop may be closed already
                self._timer.cancel()
            self._timer = None
        if not has_children():
            return 0
        found = descendants(self._pid)
        running = sum(send(proc, signal.SIGTERM) for proc, state in found.items() if state != b"Z")
        deadline = time.monotonic() + grace
        for proc in found:
            self._ending[proc] = deadline
        while time.monotonic() < deadline and any(_running(p) for p in self._ending):
            self.reap()
            time.sleep(0.01)
        for proc in self._ending:
            self._ending[proc] = 0.0
        deadline = time.monotonic() + REAP_WITHIN
        while self.finish() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        return running


def _exited(proc: Proc) -> bool:
    stat = _stat(proc.pid)
    return stat is None or stat[0] != proc.start or stat[1] == b"Z"


def _running(proc: Proc) -> bool:
    return not _exited(proc)

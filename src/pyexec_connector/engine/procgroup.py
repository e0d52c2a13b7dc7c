"""Process hygiene for worker processes: each worker leads a process group of its own, and a worker is
killed together with everything its user code started.

Why groups: workers that share the connector's group receive what is sent to that group (Ctrl-C in a
terminal, systemd's `KillMode=control-group`, `kill -- -PGID`), and the query they run is answered
"worker died" instead of being finished by the connector's orderly shutdown. And a worker killed on a
timeout would leave the subprocesses its code started running: killing the group kills them too.

Outside a container the connector needs no init: the zygote (engine/zygote.py) makes itself a child
subreaper, so what a worker's code leaves behind is reparented to it and reaped there."""
from __future__ import annotations

import contextlib
import os
import signal
import time

from .. import sandbox

# linux/prctl.h; not in the os module
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36


def lead_own_group() -> None:
    """In a child just forked: become the leader of a new process group (its id is the child's pid).
    The parent calls `os.setpgid(pid, pid)` too, so that the group exists whichever of the two runs
    first: a kill sent right after fork() returns must not miss it."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)


def adopt_as_group(pid: int) -> None:
    """In the parent, right after fork(): the other half of lead_own_group(). It fails harmlessly when the
    child already exec'd or ended."""
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Send `sig` to every process of the group `pgid` (a worker's pid). False when no such group is left.

    Only for a worker whose end has not been reported yet: once it is reaped its pid (and group id) may be
    reused; the caller guards that (see zygote.ForkedWorker.kill)."""
    if pgid <= 1:        # 0 and 1 would mean our own group and every process: never meant
        raise ValueError(f"not a worker's process group: {pgid}")
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def group_members(pgid: int) -> list[int]:
    """The pids in process group `pgid` that have not been reaped (zombies included), from /proc (Linux)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fp:
                stat = fp.read()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: the fields after it are after the last ")"
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def become_subreaper() -> bool:
    """Linux: orphans among this process's descendants are reparented to it rather than to PID 1, so it
    can reap them (the zygote does). False where the kernel cannot do it."""
    try:
        return sandbox.libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_process_name(name: str) -> None:
    """Linux: the name `ps -o comm`, top and the OOM killer's log show (15 bytes at most). A forked worker's
    command line is its zygote's: without this, workers and zygotes would look alike."""
    try:
        import ctypes
        sandbox.libc().prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def reap_all(deadline: float) -> dict[int, int]:
    """Wait for every child of this process until the monotonic `deadline`; returns {pid: exit code as
    subprocess reports it (negative: the signal)} for those reaped. Polls: SIGCHLD may be handled elsewhere."""
    reaped: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped               # no child left
        if pid:
            reaped[pid] = os.waitstatus_to_exitcode(status)
            continue
        if time.monotonic() >= deadline:
            return reaped
        time.sleep(0.005)

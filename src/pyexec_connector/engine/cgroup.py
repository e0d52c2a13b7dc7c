"""A cgroup v2 of the connector's own, holding its zygotes and spawned workers (and so everything they
start): one write to its `cgroup.kill` ends them all, whatever they did to their sessions, groups or
parents. Where none can be had (cgroup v1 only, no write access or delegation, a kernel before 5.14
without cgroup.kill) the connector runs without it, and says so once (docs/PROCESSES.md).

The console command opens it (`open_for_connector`) and kills it as it exits (`close`). A process started
for it (a zygote; a spawned worker, into a `leaf` cgroup of its own; the sentinel) joins it first thing,
before anything it runs could fork (`join`, with the directory in PYEXEC_CGROUP of its environment).
When the connector dies without closing it (SIGKILL, a crash), each zygote kills what is under it (and
the cgroup, where it may: not as workerUser), and a sentinel process in the cgroup, started with the first
spawned worker (what no zygote holds), kills the cgroup; the empty cgroup left by such a death is removed
by the next start.

The connector itself stays where it is: only what it starts moves, so its own cgroup's limits and its
service manager's view are unchanged."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

ENV = "PYEXEC_CGROUP"
_PREFIX = "pyexec-"
KILL_WAIT = 5.0      # seconds close() waits for the killed cgroup to empty


@dataclasses.dataclass
class Cgroup:
    path: str
    sentinel: subprocess.Popen | None = None     # started with the first spawned worker (leaf())


# The sentinel: a bare interpreter in the cgroup that waits for the connector to end (a pidfd: whatever
# ends it, SIGKILL too) and then kills the cgroup. It runs no user code and imports nothing but os, select,
# signal and sys; the connector's own orderly exit kills it with the rest. Only spawned workers need it
# (~10 MB): a zygote ends what is under it itself.
_SENTINEL = """
import os, select, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
path, parent = sys.argv[1], int(sys.argv[2])
with open(os.path.join(path, "cgroup.procs"), "w") as fp:
    fp.write("0")
try:
    watch = os.pidfd_open(parent)
except OSError:
    watch = None
if watch is not None and os.getppid() == parent:
    select.select([watch], [], [])
with open(os.path.join(path, "cgroup.kill"), "w") as fp:
    fp.write("1")
"""


_opened: Cgroup | None = None


def _cgroup2_mounts() -> list[tuple[str, str]]:
    """(root within the hierarchy, mount point) of every cgroup2 mount this process sees."""
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fp:
            for line in fp:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if right.split()[:1] == ["cgroup2"] and len(fields) >= 5:
                    found.append((_unescape(fields[3]), _unescape(fields[4])))
    except OSError:
        return []
    return found


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def own_directory() -> tuple[str | None, str]:
    """The directory of this process's cgroup v2, or None and why not."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as fp:
            unified = [line.rstrip("\n")[3:] for line in fp if line.startswith("0::")]
    except OSError:
        return None, "no /proc/self/cgroup (not Linux)"
    if not unified:
        return None, "no cgroup v2 hierarchy (cgroup v1 only)"
    path = unified[0]
    for root, mount in _cgroup2_mounts():
        relative = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
        if relative.startswith(".."):
            continue
        directory = os.path.normpath(os.path.join(mount, relative))
        if os.path.isdir(directory):
            return directory, ""
    return None, "the cgroup v2 hierarchy is not mounted where this process can see its own cgroup"


def open_for_connector() -> tuple[Cgroup | None, str]:
    """Make the connector's cgroup (a child of its own): (it, "") or (None, why not)."""
    global _opened
    parent, why = own_directory()
    if parent is None:
        return None, why
    _remove_stale(parent)
    path = os.path.join(parent, f"{_PREFIX}{os.getpid()}")
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError as exc:
        return None, f"cannot create a cgroup under {parent} ({exc.strerror}: no write access or delegation)"
    if not os.path.exists(os.path.join(path, "cgroup.kill")):
        _rmdir(path)
        return None, "the kernel has no cgroup.kill (Linux 5.14 or later)"
    if not os.access(os.path.join(parent, "cgroup.procs"), os.W_OK):
        _rmdir(path)
        return None, f"cannot move processes out of {parent} (no write access to its cgroup.procs)"
    _opened = Cgroup(path)
    return _opened, ""


def _start_sentinel(cgroup: Cgroup) -> None:
    try:
        cgroup.sentinel = subprocess.Popen([sys.executable, "-S", "-c", _SENTINEL, cgroup.path, str(os.getpid())],
                                           stdin=subprocess.DEVNULL, start_new_session=True, env={})
    except OSError as exc:
        log.warning("cgroup %s: no sentinel to kill it should the connector be killed (%s): what spawned "
                    "workers start may then outlive it", cgroup.path, exc)


def _remove_stale(parent: str) -> None:
    """Cgroups left by connectors that died without closing theirs (their zygote killed what was in them)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            if not name.startswith(_PREFIX) or not name[len(_PREFIX):].isdigit():
                continue
            pid = int(name[len(_PREFIX):])
            if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
                _rmdir(os.path.join(parent, name))      # fails while something still runs in it


def _rmdir(path: str) -> bool:
    """Remove a cgroup and its leaf cgroups; False while a process is still in any of them."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.rmdir(entry.path)
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


def environment(env: dict[str, str], path: str | None = None) -> dict[str, str]:
    """A child's environment, naming the cgroup it joins: `path`, else the connector's (unchanged when
    there is none)."""
    target = path if path is not None else _opened.path if _opened is not None else None
    return env if target is None else {**env, ENV: target}


def leaf(name: str) -> str | None:
    """A cgroup of its own for one spawned worker, inside the connector's (None without one): what the
    worker's code leaves when it ends, even by a crash, is killed with it (see `empty`). Forked workers
    need none: their zygote adopts and kills what they leave."""
    if _opened is None:
        return None
    if _opened.sentinel is None:
        _start_sentinel(_opened)
    path = os.path.join(_opened.path, name)
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError:
        return None
    return path


def discard(path: str) -> None:
    """Remove a leaf cgroup nothing joined (its worker could not be started)."""
    _rmdir(path)


async def empty(path: str) -> None:
    """Kill whatever is left in a leaf cgroup and remove it (bounded: KILL_WAIT)."""
    import asyncio
    kill(path)
    deadline = time.monotonic() + KILL_WAIT
    while not _rmdir(path) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def join(environ: MutableMapping[str, str] | None = None) -> str | None:
    """In a zygote or spawned worker, first thing (before it changes user): move into the cgroup its
    environment names, and take the name out of the environment (its children need not know it). Returns
    the directory, or None. A failure is not fatal: the subreaper and parent-death signals still hold."""
    path = (os.environ if environ is None else environ).pop(ENV, None)
    if not path:
        return None
    return path if _write(path, "cgroup.procs", "0") else None


def kill(path: str) -> bool:
    """SIGKILL every process in the cgroup (this one too, if it is in it)."""
    return _write(path, "cgroup.kill", "1")


def _write(path: str, name: str, text: str) -> bool:
    """Write one of the cgroup's control files; False where the kernel or its permissions refuse."""
    try:
        with open(os.path.join(path, name), "w", encoding="ascii") as fp:
            fp.write(text)
    except OSError:
        return False
    return True


def close() -> None:
    """The connector is exiting: kill what is left in its cgroup, wait (bounded) until it is empty and
    remove it."""
    global _opened
    cgroup, _opened = _opened, None
    if cgroup is None:
        return
    kill(cgroup.path)
    if cgroup.sentinel is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            cgroup.sentinel.wait(KILL_WAIT)
    deadline = time.monotonic() + KILL_WAIT
    while not _rmdir(cgroup.path) and time.monotonic() < deadline:
        time.sleep(0.02)

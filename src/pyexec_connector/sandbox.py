"""The worker boundary: what the connector does to itself and to each worker process so that user code
cannot reach the token, the reconnect secret or the machine's limits (README, "Threat model").

The connector's side: `make_non_dumpable()` at start, `check_worker_user()` while the configuration is
read, `worker_environment()` / `worker_spawn_options()` where a worker (or a zygote) is spawned.
The worker's side: `harden_worker()` first thing in its process (before anything reads a message), and
`apply_limits()` once the source's limits are known, before any user code runs.

Workers change user themselves (`harden_worker`), not through `create_subprocess_exec(user=...)`: uvloop's
subprocess support has no user/group options, and a zygote forking workers needs the same step anyway."""
from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import resource
from collections.abc import Mapping, MutableMapping
from typing import Any

PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
CAP_KILL, CAP_SETGID, CAP_SETUID = 5, 6, 7

DROP_ENV = "PYEXEC_WORKER_CREDENTIALS"      # "uid:gid" a spawned worker (or zygote) switches to first thing
# what a worker never inherits: the token, the reconnect secret, and every other CONNECTOR_* setting (the
# connector's configuration is the connector's; user code gets get_server_config(), without secrets)
SECRET_KEYS = ("authToken", "reconnectSecret")
ENV_PREFIX = "CONNECTOR_"
# the one CONNECTOR_* setting workers read themselves: which event loop they run on
# (eventloop.LOOP_ENV, written out: an environment's zygote loads this file on its own, before site-packages,
# so it imports nothing of the package; tests/test_cli_options.py checks the two agree)
WORKER_SETTINGS = frozenset({"CONNECTOR_EVENT_LOOP"})

DEFAULT_MAX_OPEN_FILES = 1024
DEFAULT_MAX_PROCESSES = 512

# the limits this worker runs under, for the error that names them (see limit_hint)
_active_limits: dict[str, int] = {}


class CredentialError(Exception):
    """The worker could not become the configured user: it must not run code as anyone else."""


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library, loaded once per process and kept: a zygote loads it before it forks, so its workers
    use its handle instead of each building one of their own (each ctypes.CDLL is a new class and its
    function pointers: ~0.3 MiB of pages a fork would copy; issue 11 (h1))."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing)."""
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _prctl(option: int, arg: int) -> int:
    result = libc().prctl(option, arg, 0, 0, 0)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


# ---- the connector ---------------------------------------------------------------------------------

def make_non_dumpable() -> bool:
    """Processes of the same user can no longer read this one's /proc/<pid>/environ, mem or maps, nor
    attach a debugger (ptrace): the kernel treats it as another user's. False where prctl is missing."""
    try:
        _prctl(PR_SET_DUMPABLE, 0)
    except (OSError, AttributeError):
        return False
    return True


def is_dumpable() -> bool:
    try:
        return _prctl(3, 0) == 1        # PR_GET_DUMPABLE
    except (OSError, AttributeError):
        return True


def _effective_capabilities() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def can_switch_users() -> bool:
    """Can this process start workers as another user and signal them afterwards?"""
    caps = _effective_capabilities()
    needed = (1 << CAP_SETUID) | (1 << CAP_SETGID) | (1 << CAP_KILL)
    return caps & needed == needed


def resolve_user(user: str) -> tuple[int, int, str]:
    """(uid, its primary gid, name) of a user name or numeric id. ValueError names what is wrong."""
    try:
        entry = pwd.getpwuid(int(user)) if user.strip().isdigit() else pwd.getpwnam(user.strip())
    except (KeyError, OverflowError):
        if user.strip().isdigit():      # a numeric id with no passwd entry (common in containers)
            uid = int(user)
            return uid, uid, user.strip()
        raise ValueError(f"names no user of this machine: {user!r}") from None
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def resolve_group(group: str) -> int:
    try:
        return grp.getgrgid(int(group)).gr_gid if group.strip().isdigit() else grp.getgrnam(group.strip()).gr_gid
    except (KeyError, OverflowError):
        if group.strip().isdigit():
            return int(group)
        raise ValueError(f"names no group of this machine: {group!r}") from None


def check_worker_user(user: str) -> tuple[int, int]:
    """The workerUser value, checked: ValueError with the reason when it cannot be used."""
    uid, gid, name = resolve_user(user)
    if uid == 0:
        raise ValueError("must not be root (uid 0): workers would have every right the connector has")
    if uid == os.geteuid():
        raise ValueError(f"is the connector's own user ({name}): workers could read its files and signal it")
    if not can_switch_users():
        raise ValueError(f"needs a connector that can start processes as another user (root, or the "
                         f"capabilities SETUID, SETGID and KILL); this one runs as uid {os.geteuid()} without "
                         f"them. Start it as root, or remove workerUser")
    unreachable = unreachable_python(uid, gid)
    if unreachable is not None:
        raise ValueError(f"names a user that cannot read the Python installation the workers run from "
                         f"({unreachable}): workers would fail to import; install Python (and the connector) "
                         f"where every user can read them, such as /usr/local")
    return uid, gid


def _may(st: os.stat_result, uid: int, gid: int, bits: tuple[int, int, int]) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid == gid:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


def unreachable_python(uid: int, gid: int) -> str | None:
    """What of this interpreter's installation (its standard library, its site-packages, this package)
    a user cannot reach, judged by the modes on the way (no supplementary groups: workers have none)."""
    import stat
    import sysconfig
    search = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)
    read = (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
    places = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
              os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    for place in sorted(places):
        path = os.path.realpath(place)
        parts = path.split(os.sep)
        for depth in range(1, len(parts) + 1):
            step = os.sep + os.path.join(*parts[1:depth]) if depth > 1 else os.sep
            try:
                st = os.stat(step)
            except OSError:
                break
            if not _may(st, uid, gid, search) or (step == path and not _may(st, uid, gid, read)):
                return f"{step} is mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}"
    return None


def _readable_by(path: str, uid: int | None, gid: int | None) -> bool:
    """Can uid/gid (None: any user at all, by the "other" bits) read the file at path?"""
    import stat
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for depth in range(1, len(parts) + 1):
        step = os.sep + os.path.join(*parts[1:depth]) if depth > 1 else os.sep
        st = os.stat(step)
        bits = (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH) if step == real else \
            (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)
        if uid is None:
            if not st.st_mode & bits[2]:
                return False
        elif not _may(st, uid, gid if gid is not None else -1, bits):
            return False
    return True


def token_file_exposure(path: str, credentials: tuple[int, int] | None) -> str | None:
    """Who besides the connector can read a server.config that holds authToken: None when nobody."""
    try:
        if credentials is not None and _readable_by(path, *credentials):
            who = f"the worker user (uid {credentials[0]})"
        elif _readable_by(path, None, None):
            who = "every user of this machine"
        else:
            return None
    except OSError:
        return None
    return (f"{path} holds authToken and is readable by {who}: user code "
            f"{'in the workers ' if credentials else ''}can read the token from it. Fix: chmod 600 {path} "
            f"(owned by the connector's user), or remove authToken from it and give the token in the "
            f"environment variable CONNECTOR_AUTH_TOKEN")


def worker_credentials(worker_user: str | None, worker_group: str | None) -> tuple[int, int] | None:
    if not worker_user:
        return None
    uid, gid = check_worker_user(worker_user)
    if worker_group:
        gid = resolve_group(worker_group)
    return uid, gid


def worker_environment(credentials: tuple[int, int] | None = None,
                       environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a worker (or a zygote) starts with: the connector's, without any CONNECTOR_*
    variable (the token, the reconnect secret, the configuration) but CONNECTOR_EVENT_LOOP, plus the user
    to switch to."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items()
           if (not k.startswith(ENV_PREFIX) or k in WORKER_SETTINGS) and k != DROP_ENV}
    if credentials is not None:
        env[DROP_ENV] = f"{credentials[0]}:{credentials[1]}"
        try:
            home = pwd.getpwuid(credentials[0]).pw_dir
        except KeyError:
            home = "/"
        env["HOME"] = home
        env.pop("USER", None)
        env.pop("LOGNAME", None)
    return env


def worker_spawn_options(credentials: tuple[int, int] | None) -> dict[str, Any]:
    """Keyword arguments for the create_subprocess_exec that starts a worker or a zygote
    (`credentials`: ServerConfig.worker_credentials)."""
    return {"env": worker_environment(credentials)}


# ---- the worker ------------------------------------------------------------------------------------

def harden_worker(environ: MutableMapping[str, str] | None = None) -> None:
    """First thing in a worker (or zygote) process: become the configured user with no supplementary
    groups (when the connector said so), and take away every way back to more privileges (setuid
    binaries, file capabilities): PR_SET_NO_NEW_PRIVS, inherited by everything it forks or runs."""
    wanted = (os.environ if environ is None else environ).pop(DROP_ENV, None)
    if wanted:
        uid, gid = (int(part) for part in wanted.split(":"))
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except OSError as exc:
            raise CredentialError(f"cannot become uid {uid} gid {gid}: {exc}") from exc
        if os.getresuid() != (uid, uid, uid) or os.getgroups() not in ([], [gid]):
            raise CredentialError(f"still runs as {os.getresuid()} with groups {os.getgroups()}")
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise CredentialError("could become root again after switching users")
    try:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
    except (OSError, AttributeError):
        pass            # not Linux: nothing to do
    # workers of other sources run as the same user: none may read another's memory (its queries' data)
    make_non_dumpable()


def no_new_privs() -> bool:
    try:
        return _prctl(PR_GET_NO_NEW_PRIVS, 0) == 1
    except (OSError, AttributeError):
        return False


def apply_limits(max_open_files: int | None, max_processes: int | None) -> None:
    """Per-process limits, lowered hard as well as soft so that user code cannot raise them again.
    RLIMIT_NPROC is only given when the worker runs as a user of its own (`max_processes` None otherwise):
    Linux counts it per user, over every process and thread of that user, so for the connector's own
    user it would strike the connector."""
    _active_limits.clear()
    if max_open_files:
        _lower(resource.RLIMIT_NOFILE, max_open_files)
        _active_limits["maxOpenFiles"] = max_open_files
    if max_processes:
        _lower(resource.RLIMIT_NPROC, max_processes)
        _active_limits["maxProcessesPerWorker"] = max_processes


def _lower(which: int, limit: int) -> None:
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY and hard < limit:
        limit = hard
    resource.setrlimit(which, (limit, limit))


def limit_hint(exc: BaseException) -> str | None:
    """When user code's error is one of this worker's limits being hit: which, and what to change."""
    if not isinstance(exc, OSError):
        return None
    if exc.errno == errno.EAGAIN and "maxProcessesPerWorker" in _active_limits \
            and isinstance(exc, BlockingIOError):
        return (f"the worker user's process limit was reached (maxProcessesPerWorker = "
                f"{_active_limits['maxProcessesPerWorker']}, counting every process and thread of the worker user)")
    if exc.errno in (errno.EMFILE,) and "maxOpenFiles" in _active_limits:
        return f"the worker's open file limit was reached (maxOpenFiles = {_active_limits['maxOpenFiles']})"
    return None

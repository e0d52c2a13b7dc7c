"""The zygote: a template interpreter that has imported the worker runtime and a source's `preload`
modules once, and forks ready workers from itself in milliseconds, sharing those pages copy-on-write.

    connector ──control (SOCK_SEQPACKET, JSON)──► zygote ──fork()──► worker (own process group)
              ◄─────────── worker socket (passed to the zygote with SCM_RIGHTS) ──────────┘

The zygote is itself spawned (`python -m pyexec_connector.engine.zygote FD CONNECTOR_PID MODULE...`), never
forked from the connector: it never holds the access token (its environment has none, its argv names
only modules) and it never runs a query. Like multiprocessing's forkserver it runs a plain selector loop:
fork requests come in on the control socket with the worker's end of a fresh socket pair; it forks, and
the child runs the same worker main loop a spawned worker runs. The connector cannot waitpid() a
grandchild, so the zygote reaps its children and reports each end as (pid, exit code) on the control
socket. It is also a child subreaper, so what user code leaves behind when its worker ends is reparented
here, and killed and reaped at once (engine/reaper.py); so is everything under it when the connector
dies (its parent-death signal) or stops it. Before it says it is ready it
runs the worker runtime once (_warm_up), so that what a worker's first queries write (lazy caches,
quickened bytecode) is written once, in pages its forks share, not again in each of them.

What must not happen in preload: starting threads that are relied on after fork (only the forking thread
exists in a worker), or initialising a GPU runtime such as CUDA (it does not survive fork)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from .. import sandbox
from . import cgroup, procgroup, reaper

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0     # seconds the zygote has to import its preload list and say it is ready
FORK_TIMEOUT = 10.0       # seconds a fork request may take
STOP_GRACE = 2.0          # seconds workers have to end by themselves when the zygote stops
REAP_TIMEOUT = 5.0        # seconds to reap what was killed with SIGKILL
_MAX_MESSAGE = 64 * 1024  # bytes of one control message, either way
_RUNTIME = "pyexec_connector.engine.worker"
# environment variables no process that runs user code may inherit


class ZygoteError(Exception):
    """The zygote could not start, fork or went away."""


class PreloadError(ZygoteError):
    """A module of the preload list could not be imported: a configuration error of the source."""

    def __init__(self, module: str, reason: str):
        super().__init__(f"pythonExecConfig.general.preload: module {module!r} could not be imported: {reason}")
        self.module = module
        self.reason = reason


class ZygoteGone(ZygoteError):
    """The zygote ended (stopped, or died): it forks no more workers."""


# How a process on another interpreter (a per-script environment's, envs/) starts: isolated (-I: no
# PYTHONPATH or user site-packages, which would show it the connector's packages) and without `site` (-S),
# the connector's own sandbox module loaded by its path (it needs only the standard library), hardened
# (the workers' user, no new privileges), and only then `site`, which runs the start-up hooks (.pth files)
# of the packages a script chose, and the module. argv: SANDBOX_PATH MODULE ARGS...
_BOOT = (
    "import importlib.util, runpy, site, sys\n"
    "spec = importlib.util.spec_from_file_location('_pyexec_boot_sandbox', sys.argv[1])\n"
    "boot = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(boot)\n"
    "boot.harden_worker()\n"
    "site.main()\n"
    "module, sys.argv = sys.argv[2], [sys.argv[0], *sys.argv[3:]]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n")


def interpreter_command(python: str | None, module: str) -> list[str]:
    """The command that runs `module` (a zygote or a worker) on `python` (None: the connector's own). On
    another interpreter the packages' start-up hooks run only once the process is hardened (_BOOT): in
    the hardened mode they run as the workers' user, never as the connector's."""
    if python is None or python == sys.executable:
        return [sys.executable, "-m", module]
    return [python, "-I", "-S", "-c", _BOOT, str(sandbox.__file__), module]


def clean_environment() -> dict[str, str]:
    """The connector's environment without its secrets (no CONNECTOR_* variable): what the zygote and every
    worker start from when no sandbox options are given."""
    return sandbox.worker_environment(None)


# ---- the connector's side ------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class ForkedWorker:
    """A worker forked by a zygote: its pid (also its process group's id) and the connector's end of its
    socket. `exited` resolves to its exit code as subprocess reports it (negative: killed by that signal),
    or None when its zygote vanished before it could report. pid, returncode, wait(), kill(),
    terminate() and send_signal() work as asyncio.subprocess.Process's do (for the whole group), so a pool
    can watch a forked worker as it watches a spawned one."""

    pid: int
    sock: socket.socket
    exited: asyncio.Future[int | None]
    # a copy of the worker's own end: what it has not read yet is asked there (FIONREAD, exact); the pool
    # closes it when the worker ends (engine/handle.py, WorkerHandle.unread)
    peer: socket.socket | None = None

    @property
    def returncode(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    def kill(self, sig: int = signal.SIGKILL) -> bool:
        """Signal the worker's whole process group: it and whatever its code started. Nothing once its end
        was reported, since its pid may then belong to another process."""
        if self.exited.done():
            return False
        return procgroup.kill_group(self.pid, sig)

    def send_signal(self, sig: int) -> None:
        self.kill(sig)

    def terminate(self) -> None:
        self.kill(signal.SIGTERM)

    async def wait(self) -> int | None:
        return await asyncio.shield(self.exited)


class Zygote:
    """The connector's handle on one zygote process. start(), then fork_worker() as often as needed,
    then stop(). Not thread-safe: one event loop."""

    def __init__(self, preload: Sequence[str] = (), options: dict[str, Any] | None = None,
                 python: str | None = None):
        self.preload = tuple(preload)
        # the interpreter it runs on: the connector's own, or a per-script environment's (envs/), which
        # holds the connector's runtime too
        self.python = python or sys.executable
        # how it is started (sandbox.worker_spawn_options: its environment, the user it and its forks become)
        self._options = options if options is not None else {"env": clean_environment()}
        self.workers: dict[int, ForkedWorker] = {}      # forked, end not yet reported
        self.threads: tuple[str, ...] = ()               # threads the preload left running (a warning)
        self.warmed_up = 0                               # queries its warm-up ran (see _warm_up)
        self.returncode: int | None = None               # of the zygote, once it ended
        self._proc: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._ready: asyncio.Future[None] | None = None
        self._pending: dict[int, tuple[asyncio.Future[ForkedWorker], socket.socket]] = {}
        self._ids = itertools.count(1)
        self._gone = False
        self._watcher: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._gone

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Spawn the zygote and wait until it has imported its preload list. Raises PreloadError naming the
        module that failed (the zygote has then ended: nothing is retried), ZygoteError otherwise."""
        if self._proc is not None:
            raise RuntimeError("this zygote was started already")
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            options = {**self._options, "env": cgroup.environment(self._options.get("env") or clean_environment())}
            self._proc = await asyncio.create_subprocess_exec(
                *interpreter_command(self.python, "pyexec_connector.engine.zygote"), str(theirs.fileno()),
                str(os.getpid()),
                *self.preload, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, **options,
                # a group (and session) of its own: signals for the connector's group or terminal are not for
                # it. Not process_group=0: uvloop's subprocess_exec refuses that argument.
                start_new_session=True)
        except OSError as exc:
            ours.close()
            raise ZygoteError(f"the zygote process could not be started: {exc}") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._readable)
        self._watcher = asyncio.ensure_future(self._watch())
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._ready)
        except TimeoutError:
            self._ready.cancel()     # nobody waits for it any more
            await self.stop(grace=0)
            raise ZygoteError(f"the zygote did not import its preload list within {timeout:g} s") from None
        except ZygoteError:
            await self.stop(grace=0)
            raise
        if self.threads:
            log.warning("pythonExecConfig.general.preload left threads running (%s): workers forked from the "
                        "zygote do not have them", ", ".join(self.threads))

    async def fork_worker(self, timeout: float = FORK_TIMEOUT) -> ForkedWorker:
        """A new worker, forked from the zygote, leading its own process group and waiting for the
        worker protocol's first message on `sock`, as a spawned worker does."""
        ready = self._ready
        if not self.alive or ready is None or not ready.done() or ready.cancelled() or ready.exception():
            raise ZygoteGone("the zygote is not running")
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        request = next(self._ids)
        forked: asyncio.Future[ForkedWorker] = loop.create_future()
        self._pending[request] = (forked, ours)
        try:
            await self._send({"kind": "fork", "id": request}, fds=(theirs.fileno(),))
            peer = theirs.dup()
        except BaseException:
            self._pending.pop(request, None)
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            async with asyncio.timeout(timeout):
                worker = await asyncio.shield(forked)
            worker.peer = peer
            return worker
        except BaseException:
            peer.close()
            # timed out or cancelled: a worker forked after all is killed when its pid arrives (_forked)
            if self._pending.pop(request, None) is not None:
                ours.close()
            elif forked.done() and not forked.cancelled() and forked.exception() is None:
                worker = forked.result()
                worker.kill()
                worker.sock.close()
            raise

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop the zygote: workers still running get `grace` seconds to end (the pool tells them to stop
        first), then their groups are killed; the zygote reaps everything and exits. Every wait bounded."""
        proc = self._proc
        if proc is None:
            return
        if self.alive:
            with contextlib.suppress(OSError, ZygoteError):
                await self._send({"kind": "stop", "grace": grace})
        try:
            async with asyncio.timeout(grace + REAP_TIMEOUT + 1.0):
                await proc.wait()
        except TimeoutError:
            log.warning("zygote %s did not stop in time: killed", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REAP_TIMEOUT):
                    await proc.wait()
        if self._watcher is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._watcher
        self._lost("the zygote stopped")

    # ---- the control socket ---------------------------------------------------------------------
    async def _send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = json.dumps(message).encode()
        deadline = time.monotonic() + 1.0
        while True:
            if self._control is None:
                raise ZygoteGone("the zygote's control socket is closed")
            try:
                socket.send_fds(self._control, [data], list(fds))
                return
            except BlockingIOError:
                # the zygote reads its requests at once: a full socket means it is stuck
                if time.monotonic() > deadline:
                    raise ZygoteError("the zygote does not read its requests") from None
                await asyncio.sleep(0.005)
            except OSError as exc:
                raise ZygoteGone(f"the zygote's control socket failed: {exc}") from exc

    def _readable(self) -> None:
        while self._control is not None:
            try:
                data = self._control.recv(_MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost("the zygote closed its control socket")
                return
            try:
                message = json.loads(data)
                self._handle(message)
            except Exception as exc:  # noqa: BLE001 - the zygote runs no user code: this is a bug
                log.error("zygote %s sent a message that could not be handled: %r", self.pid, exc)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["kind"]
        if kind == "ready":
            self.threads = tuple(message.get("threads", ()))
            self.warmed_up = int(message.get("warmed_up", 0))
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif kind == "preload-failed":
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(PreloadError(message["module"], message["error"]))
        elif kind == "forked":
            self._forked(message["id"], message["pid"])
        elif kind == "fork-failed":
            pending = self._pending.pop(message["id"], None)
            if pending is not None:
                pending[1].close()
                if not pending[0].done():
                    pending[0].set_exception(ZygoteError(f"the zygote could not fork a worker: {message['error']}"))
        elif kind == "exit":
            worker = self.workers.pop(message["pid"], None)
            if worker is not None and not worker.exited.done():
                worker.exited.set_result(message["returncode"])

    def _forked(self, request: int, pid: int) -> None:
        # registered here, not when fork_worker() resumes: its end may be reported in the same read
        pending = self._pending.pop(request, None)
        if pending is None:
            procgroup.kill_group(pid)         # its requester gave up waiting; its end is reported later
            return
        worker = ForkedWorker(pid, pending[1], asyncio.get_running_loop().create_future())
        self.workers[pid] = worker
        if not pending[0].done():
            pending[0].set_result(worker)

    async def _watch(self) -> None:
        assert self._proc is not None
        self.returncode = await self._proc.wait()
        # what it wrote before it ended is read first (a preload failure, the last exits)
        self._readable()
        self._lost(f"the zygote ended ({self.returncode})")

    def _lost(self, why: str) -> None:
        """The zygote is gone: nothing waits for it any more. Its workers die with it (their parent-death
        signal); their groups are killed here too, so what their code started does not outlive them."""
        if self._gone and self._control is None:
            return
        self._gone = True
        if self._control is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._control.fileno())
            self._control.close()
            self._control = None
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ZygoteError(f"{why} before it was ready"))
        for forked, sock in self._pending.values():
            sock.close()
            if not forked.done():
                forked.set_exception(ZygoteGone(why))
        self._pending.clear()
        for worker in self.workers.values():
            worker.kill()
            if not worker.exited.done():
                worker.exited.set_result(None)
        self.workers.clear()


class ZygoteRegistry:
    """One zygote per interpreter and preload list: sources whose lists are equal share it, and so do
    queries of every source whose scripts run in the same per-script environment. Reference-counted: acquire()
    starts it on first use, release() stops it after its last user. A zygote that died is replaced on the
    next acquire(); one whose preload failed is not kept, so the error is reported to each acquirer and
    nothing restarts it in a loop."""

    def __init__(self, factory: Callable[..., Zygote] = Zygote,
                 start_timeout: float = START_TIMEOUT):
        self._factory = factory
        self._start_timeout = start_timeout
        self._entries: dict[tuple[str, tuple[str, ...]], _Entry] = {}

    def zygotes(self, python: str | None = None) -> dict[tuple[str, ...], Zygote]:
        """{preload: zygote} of one interpreter (by default the connector's own)."""
        python = python or sys.executable
        return {key[1]: entry.zygote for key, entry in self._entries.items() if key[0] == python}

    async def acquire(self, preload: Sequence[str], options: dict[str, Any] | None = None,
                      python: str | None = None) -> Zygote:
        """The zygote for `preload` on `python` (default: the connector's interpreter), started with
        `options` (see Zygote) by its first acquirer: the worker user is one per connector (server.config),
        so sources that share a zygote share its options."""
        key = (python or sys.executable, tuple(preload))
        entry = self._entries.get(key)
        if entry is not None and entry.started.done() and not entry.zygote.alive:
            del self._entries[key]           # it died: its users' workers died with it
            entry = None
        if entry is None:
            zygote = self._make(key[1], options, python)
            entry = _Entry(zygote, asyncio.ensure_future(zygote.start(self._start_timeout)))
            self._entries[key] = entry
        entry.refs += 1
        try:
            await asyncio.shield(entry.started)
        except BaseException:
            entry.refs -= 1
            if self._entries.get(key) is entry and (entry.refs == 0 or entry.started.done()):
                del self._entries[key]
                if not entry.started.done():       # cancelled while starting, and nobody else waits
                    entry.started.add_done_callback(_stop_unused(entry.zygote))
            raise
        return entry.zygote

    def _make(self, preload: tuple[str, ...], options: dict[str, Any] | None, python: str | None) -> Zygote:
        # only what was given is passed on: a factory written for (preload, options) keeps working
        if python is not None:
            return self._factory(preload, options, python)
        return self._factory(preload) if options is None else self._factory(preload, options)

    async def release(self, zygote: Zygote) -> None:
        key = (getattr(zygote, "python", sys.executable), zygote.preload)
        entry = self._entries.get(key)
        if entry is None or entry.zygote is not zygote:
            await zygote.stop()              # replaced after it died: nobody else has it
            return
        entry.refs -= 1
        if entry.refs <= 0:
            del self._entries[key]
            await zygote.stop()

    async def close(self) -> None:
        entries = list(self._entries.values())
        self._entries.clear()
        await asyncio.gather(*(e.zygote.stop() for e in entries), return_exceptions=True)


def _stop_unused(zygote: Zygote) -> Callable[[asyncio.Future[None]], None]:
    def stop(started: asyncio.Future[None]) -> None:
        # a start that failed has stopped its zygote already (and its error was reported to the waiters)
        if not started.cancelled() and started.exception() is None:
            asyncio.ensure_future(zygote.stop(0))
    return stop


_REGISTRIES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ZygoteRegistry] = weakref.WeakKeyDictionary()


def registry() -> ZygoteRegistry:
    """The running loop's registry: every source's pool in this connector shares its zygotes (one per loop,
    since a zygote's handle belongs to the loop it was started on)."""
    loop = asyncio.get_running_loop()
    found = _REGISTRIES.get(loop)
    if found is None:
        found = _REGISTRIES[loop] = ZygoteRegistry()
    return found


@dataclasses.dataclass(eq=False)
class _Entry:
    zygote: Zygote
    started: asyncio.Future[None]
    refs: int = 0


# ---- the zygote's side ---------------------------------------------------------------------------------

class _Server:
    """The zygote process: preloads, then forks on request until told to stop or the connector is gone."""

    def __init__(self, control: socket.socket, connector_pid: int = 0, cgroup_path: str | None = None):
        self.control = control
        self.connector_pid = connector_pid
        self.cgroup_path = cgroup_path      # the connector's cgroup (engine/cgroup.py), when it has one
        self.children: set[int] = set()
        self.sig_r, self.sig_w = os.pipe()
        self.selector = selectors.DefaultSelector()

    def send(self, message: dict[str, Any]) -> None:
        self.control.send(json.dumps(message).encode())

    def serve(self) -> int:
        os.set_blocking(self.sig_r, False)
        os.set_blocking(self.sig_w, False)
        # the handler does nothing: the wakeup fd tells the selector that a child ended
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.sig_w)
        self.selector.register(self.control, selectors.EVENT_READ)
        self.selector.register(self.sig_r, selectors.EVENT_READ)
        while True:
            for key, _ in self.selector.select():
                if key.fileobj == self.sig_r:
                    self._drain_signals()
                    if self.connector_pid and os.getppid() != self.connector_pid:
                        return self.connector_died()     # its parent-death signal
                    self.reap()
                    continue
                try:
                    data, fds, _, _ = socket.recv_fds(self.control, _MAX_MESSAGE, 4)
                except OSError:
                    data, fds = b"", []
                if not data:                    # the connector is gone
                    return self.connector_died()
                message = json.loads(data)
                if message["kind"] == "fork":
                    self.fork(message["id"], fds)
                    continue
                for fd in fds:
                    os.close(fd)
                if message["kind"] == "stop":
                    return self.shutdown(float(message.get("grace", STOP_GRACE)))

    def _drain_signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.sig_r, 4096):
                pass

    def fork(self, request: int, fds: list[int]) -> None:
        worker_fd, *extra = fds or [-1]
        for fd in extra:
            os.close(fd)
        if worker_fd < 0:
            self.send({"kind": "fork-failed", "id": request, "error": "no socket came with the request"})
            return
        gc.freeze()     # what the zygote holds stays out of the workers' collections: their pages stay shared
        # the zygote's SIGTERM handler ignores it (see main); a worker must die of one sent right after fork
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            os.close(worker_fd)
            self.send({"kind": "fork-failed", "id": request, "error": str(exc)})
            return
        if pid == 0:
            self._become_worker(worker_fd)       # never returns
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        procgroup.adopt_as_group(pid)
        os.close(worker_fd)
        self.children.add(pid)
        self.send({"kind": "forked", "id": request, "pid": pid})

    def _become_worker(self, worker_fd: int) -> None:
        code = 1
        try:
            procgroup.lead_own_group()
            procgroup.set_process_name("pyexec-worker")
            zygote_pid = os.getppid()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.selector.close()
            self.control.close()
            os.close(self.sig_r)
            os.close(self.sig_w)
            _reseed_after_fork()
            # the worker's own entry, as a spawned worker runs it: its socket and the parent it dies with
            sys.argv = [sys.argv[0], str(worker_fd), str(zygote_pid)]
            from . import worker
            worker.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:    # noqa: BLE001 - reported on stderr, as an uncaught exception would be
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)     # never back into the zygote's loop

    def reap(self) -> None:
        reaped = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reaped = True
            if pid in self.children:
                self.children.discard(pid)
                procgroup.kill_group(pid)       # what its code started dies with it
                with contextlib.suppress(OSError):
                    self.send({"kind": "exit", "pid": pid, "returncode": os.waitstatus_to_exitcode(status)})
            # else an orphan of some worker's code, reparented here (subreaper): reaped, nothing to report
        if reaped:
            # a worker ended: what its code started was reparented here, and ends now (issue 21)
            reaper.kill_orphans(self.children)

    def connector_died(self) -> int:
        """Nothing started under the connector outlives it: what is under this zygote is killed; then, when
        the connector is really gone (this process was reparented) and this zygote may (not as workerUser:
        the sentinel does it then), its whole cgroup, this zygote included (engine/cgroup.py)."""
        code = self.shutdown(0.0)
        if self.cgroup_path is not None and self.connector_pid and os.getppid() != self.connector_pid:
            sys.stdout.flush()
            sys.stderr.flush()
            cgroup.kill(self.cgroup_path)
        return code

    def shutdown(self, grace: float) -> int:
        deadline = time.monotonic() + grace
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.control)      # from now on only children's ends are waited for
        while self.children and time.monotonic() < deadline:
            if self.selector.select(max(0.0, deadline - time.monotonic())):
                self._drain_signals()
            self.reap()
        for pid in list(self.children):
            procgroup.kill_group(pid)
        deadline = time.monotonic() + REAP_TIMEOUT
        while True:
            reaper.kill_descendants()       # whatever workers left, in whatever session: nothing outlives us
            for pid, returncode in procgroup.reap_all(deadline).items():
                if pid in self.children:
                    self.children.discard(pid)
                    with contextlib.suppress(OSError):
                        self.send({"kind": "exit", "pid": pid, "returncode": returncode})
            if not reaper.has_children() or time.monotonic() >= deadline:
                return 0


def _reseed_after_fork() -> None:
    """Forked workers would share numpy's global random state (the random module reseeds itself after
    fork; numpy does not): each worker draws its own, as a spawned worker does."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        with contextlib.suppress(Exception):
            numpy_random.seed()


def _die_with(parent_pid: int) -> None:
    """Linux: the kernel tells the zygote when the connector ends, even by SIGKILL (SIGTERM, which the
    zygote takes for "the connector is gone" only when its parent has changed): it then kills everything
    under it and exits. Its workers die with it (the worker runtime sets SIGKILL for its own parent)."""
    try:
        sandbox.libc().prctl(1, signal.SIGTERM, 0, 0, 0)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def _preload(modules: Sequence[str]) -> tuple[str, str] | None:
    """Import the worker runtime, then each module in order; (module, reason) of the first that fails."""
    import importlib

    from ..eventloop import event_loop_factory
    event_loop_factory()     # imports uvloop (creates no loop): every worker would import it first thing
    for module in (_RUNTIME, *modules):
        try:
            importlib.import_module(module)
        except BaseException as exc:    # noqa: BLE001 - SystemExit or anything a module may raise at import
            return module, f"{type(exc).__name__}: {exc}"
    return None


WARM_UP_QUERIES = 64      # run through the worker runtime in the zygote before it forks (see _warm_up)
WARM_UP_TIMEOUT = 30.0    # seconds the warm-up may take; past it the zygote goes on without


def _warm_up(queries: int = WARM_UP_QUERIES) -> int:
    """Run the worker runtime here, over a socket pair, on a loop of its own that is closed again: Init,
    `queries` queries (`x = 1`), Stop; then numpy's reseed, as every fork runs it. Whatever a worker does
    first would otherwise be done in every fork, each in pages of its own: fill the lazily built caches of
    asyncio, uvloop, ctypes and the runtime, and let Python 3.11 rewrite (quicken) the bytecode of every
    function on that path in place. Done here, those pages are written once and shared: ~0.5 MiB less of
    each worker's own memory (docs/PERFORMANCE.md, issue 11 (h1)).

    Nothing else is left of it: the output capture and the fork guard are undone, the sockets and the
    loop closed. It is an optimisation only: should it fail, the zygote logs why and forks as before.
    Returns the number of queries answered."""
    from .. import forkguard, protocol
    from ..eventloop import event_loop_factory
    from . import messages, wire, worker

    stdout, stderr = sys.stdout, sys.stderr
    ours, theirs = socket.socketpair()
    settings = {"source_name": "zygote-warm-up", "server_config": {}, "healthy": True, "cache_capacity": 16,
                "forbid": (), "memory_limit_mb": None, "runtime_info": False, "rich_results": False,
                "max_message_bytes": None, "max_open_files": None, "max_processes": None}
    raw = protocol.dumps({"op": "query", "object": {"code": "x = 1"}}).encode()
    answered = 0

    async def session() -> None:
        nonlocal answered
        # the worker's socket object owns that end from here on (serve() wraps the descriptor)
        serving = asyncio.ensure_future(worker.Worker(theirs.detach()).serve())
        reader, writer = await wire.open_pipe(ours, trusted=False)
        try:
            writer.write(wire.encode(messages.Init(settings)))
            for qid in range(1, queries + 1):
                writer.write(wire.encode(messages.Relay(qid, "warm-up", None, raw)))
            while answered < queries:
                message = await wire.read(reader)
                if type(message) in (messages.Answered, messages.Done):
                    answered += 1
                elif type(message) in (messages.Failed, messages.Cancelled):
                    raise ZygoteError(f"a warm-up query failed: {message}")
            writer.write(wire.encode(messages.Stop()))
            await serving
        finally:
            serving.cancel()
            writer.close()

    loop_factory, _ = event_loop_factory()
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(asyncio.wait_for(session(), WARM_UP_TIMEOUT))
    except Exception as exc:  # noqa: BLE001 - an optimisation: the zygote works without it
        log.warning("the worker runtime's warm-up failed (%s: %s); workers are forked without it",
                    type(exc).__name__, exc)
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        forkguard.disarm()
        ours.close()
        theirs.close()      # a no-op once detached
    _reseed_after_fork()
    return answered


def main() -> None:
    # first: the worker user and no new privileges (its forks inherit both), before the preload runs any
    # module's code; and before _die_with, since a change of user clears the parent-death signal
    cgroup_path = cgroup.join()      # first: what it forks from here on is in the connector's cgroup
    sandbox.harden_worker()
    control_fd, connector_pid, modules = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    _die_with(connector_pid)
    # signals meant for the connector's terminal or group are not the zygote's: the connector stops it.
    # SIGTERM wakes its loop (the parent-death signal, see _Server.serve), and ends it only if the
    # connector is gone: under systemd's KillMode=control-group the connector gets one at the same time
    # and stops the zygote itself, after its in-flight queries.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: None)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="pyexec-zygote[%(process)d] %(levelname)s %(name)s: %(message)s")
    control = socket.socket(fileno=control_fd)
    control.settimeout(REAP_TIMEOUT)     # a connector that does not read is treated as gone
    failed = _preload(modules)
    if failed is not None:
        with contextlib.suppress(OSError):
            control.send(json.dumps({"kind": "preload-failed", "module": failed[0], "error": failed[1]}).encode())
        os._exit(1)
    warmed_up = _warm_up()
    procgroup.become_subreaper()
    procgroup.set_process_name("pyexec-zygote")
    gc.freeze()
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    server = _Server(control, connector_pid, cgroup_path)
    try:
        server.send({"kind": "ready", "pid": os.getpid(), "threads": threads, "warmed_up": warmed_up})
        code = server.serve()
    except OSError:
        code = server.connector_died()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

"""Where a pool's workers come from: one call, `launch()`, that the pool makes whenever it wants a
worker, whether it is forked from the zygote of the source's preload list or spawned as a fresh
interpreter (when the zygote cannot run). Either way the worker leads its own process group, its handle
kills that whole group, and its environment holds no secret.

Both handles answer pid, returncode, wait(), kill(), terminate() and send_signal() as
asyncio.subprocess.Process does, so the pool watches and stops them alike."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from . import cgroup, procgroup, reaper
from .zygote import (
    FORK_TIMEOUT,
    ForkedWorker,
    PreloadError,
    Zygote,
    ZygoteError,
    ZygoteRegistry,
    clean_environment,
    interpreter_command,
)

log = logging.getLogger(__name__)
_SPAWNED = itertools.count(1)      # names of spawned workers' leaf cgroups


class WorkerProcess(Protocol):
    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int | None: ...
    def kill(self) -> object: ...
    def terminate(self) -> None: ...
    def send_signal(self, sig: int) -> None: ...


@dataclasses.dataclass(eq=False)
class Launched:
    """A worker just started: its process and the connector's end of its socket, on which it waits for
    the worker protocol's first message."""

    process: WorkerProcess
    sock: socket.socket
    forked: bool
    peer: socket.socket | None = None      # a copy of the worker's end (see zygote.ForkedWorker.peer)


class SpawnedWorker:
    """A spawned worker (asyncio's Process) whose signals go to its whole process group. `leaf`: its own
    cgroup (engine/cgroup.py), emptied when it ends, or None."""

    def __init__(self, proc: asyncio.subprocess.Process, leaf: str | None = None):
        self._proc = proc
        self._leaf = leaf

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        code = await self._proc.wait()
        leaf, self._leaf = self._leaf, None
        if leaf is not None:
            await cgroup.empty(leaf)     # what its code started, also in a session of its own, ends with it
        return code

    def send_signal(self, sig: int) -> None:
        # once reaped (returncode set), its pid may belong to another process: nothing more is sent
        if self._proc.returncode is None:
            procgroup.kill_group(self._proc.pid, sig)

    def kill(self) -> None:
        if self._proc.returncode is None:
            # no zygote adopts what its code started once it is dead: killed here first, while still under it
            reaper.kill_descendants(self._proc.pid)
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


async def spawn_worker(options: dict[str, Any] | None = None, python: str | None = None) -> Launched:
    """A fresh interpreter running the worker runtime (`python -m pyexec_connector.engine.worker FD PID`), in
    a session and process group of its own. `options`: sandbox.worker_spawn_options (its environment, and
    the user it becomes); by default an environment without secrets. `python`: the interpreter (default:
    the connector's; a per-script environment's runs the script with its packages)."""
    options = options if options is not None else {"env": clean_environment()}
    leaf = cgroup.leaf(f"spawned-{next(_SPAWNED)}")
    options = {**options, "env": cgroup.environment(options.get("env") or clean_environment(), leaf)}
    ours, theirs = socket.socketpair()
    peer = theirs.dup()
    try:
        proc = await asyncio.create_subprocess_exec(
            *interpreter_command(python, "pyexec_connector.engine.worker"), str(theirs.fileno()), str(os.getpid()),
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True,  # not process_group=0:
            **options)                                                                     # uvloop refuses it
    except BaseException:
        ours.close()
        peer.close()
        if leaf is not None:
            cgroup.discard(leaf)
        raise
    finally:
        theirs.close()
    return Launched(SpawnedWorker(proc, leaf), ours, forked=False, peer=peer)


class WorkerLauncher:
    """A pool's source of workers. open() acquires the zygote for `preload` from the registry; launch()
    forks from it, or spawns when there is no zygote: its preload failed (a configuration error of the
    source, kept in `problem` and logged once, naming the module), it could not start, or it died and
    could not be replaced. close() gives the zygote back. `python`: the interpreter its zygote and spawned
    workers run on (default: the connector's; envs.Environment.python for a per-script environment)."""

    def __init__(self, registry: ZygoteRegistry | None, preload: Sequence[str] = (), source_name: str = "?",
                 spawn_options: Callable[[], dict[str, Any]] | None = None, python: str | None = None):
        self._registry = registry
        self.python = python
        # how a worker or a zygote is started (its environment, the user it becomes): sandbox.py
        self._spawn_options = spawn_options
        self.preload = tuple(preload)
        self.source_name = source_name
        self.problem: ZygoteError | None = None     # why workers are spawned, not forked
        self._zygote: Zygote | None = None
        self.forks = 0
        self.spawns = 0

    @property
    def zygote(self) -> Zygote | None:
        return self._zygote

    async def open(self) -> None:
        if self._registry is None:
            return
        try:
            options = self._spawn_options() if self._spawn_options is not None else None
            if self.python is None:
                self._zygote = await self._registry.acquire(self.preload, options)
            else:
                self._zygote = await self._registry.acquire(self.preload, options, self.python)
            self.problem = None
        except PreloadError as exc:
            self.problem = exc
            log.error("source %s: %s; its workers are spawned without it", self.source_name, exc)
        except ZygoteError as exc:
            self.problem = exc
            log.error("source %s: no zygote (%s); its workers are spawned", self.source_name, exc)

    async def launch(self, timeout: float = FORK_TIMEOUT) -> Launched:
        zygote = self._zygote
        if zygote is not None and not zygote.alive and self._registry is not None:
            await self._registry.release(zygote)     # it died: a new one for the next workers
            self._zygote = None
            await self.open()
            zygote = self._zygote
        if zygote is not None:
            try:
                worker: ForkedWorker = await zygote.fork_worker(timeout)
            except ZygoteError as exc:
                log.warning("source %s: the zygote could not fork a worker (%s); spawning one", self.source_name, exc)
            else:
                self.forks += 1
                return Launched(worker, worker.sock, forked=True, peer=worker.peer)
        self.spawns += 1
        return await spawn_worker(self._spawn_options() if self._spawn_options is not None else None, self.python)

    async def close(self) -> None:
        zygote, self._zygote = self._zygote, None
        if zygote is not None and self._registry is not None:
            with contextlib.suppress(Exception):
                await self._registry.release(zygote)

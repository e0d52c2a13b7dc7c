"""Forked (zygote) vs spawned workers, measured alternately in one run, outside the connector: the zygote
is not wired into the process engine yet, so this measures the part by itself.

    python -m bench.zygote_fork [--preload pandas] [--rounds 7] [--workers 4]

- latency: from asking for a worker to the reply of its first query, whose code imports the preloaded
  modules (what a query waits for after its worker was replaced): spawned = a fresh interpreter that
  imports the runtime and then, in the query, the module; forked = fork of a zygote that preloaded it;
- memory: total PSS (psutil) of N spawned workers that each ran that query, against the zygote plus N
  forked workers that ran it, and against one spawned worker."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from pyexec_connector import protocol
from pyexec_connector.engine import wire
from pyexec_connector.engine.zygote import Zygote, clean_environment

_INIT = {"source_name": "bench", "server_config": {}, "healthy": True, "cache_capacity": 16, "forbid": (),
         "memory_limit_mb": None, "runtime_info": False, "max_message_bytes": None}

try:     # the typed worker messages of the rebuilt process engine (issue 10), when it is there
    from pyexec_connector.engine import messages as _typed
except ImportError:
    _typed = None


class WorkerClient:
    """The connector's side of the worker protocol, enough to start a worker and run code on it: the one
    place here (and in tests/test_zygote.py) that knows the protocol. Speaks both the tuple messages and
    the typed ones, until the pool that forks from the zygote replaces it."""

    def __init__(self, sock: socket.socket, pid: int):
        self.sock, self.pid = sock, pid
        self._ids = 0

    async def ready(self) -> int:
        """Send the settings, wait for the worker's first message; returns the pid it reports."""
        if _typed is None:
            self.reader, self.writer = await wire.open_pipe(self.sock, 2 ** 20, trusted=False)
            self.writer.write(wire.pack(("init", _INIT)))
        else:
            self.reader, self.writer = await wire.open_pipe(self.sock, trusted=False)
            self.writer.write(wire.encode(_typed.Init(_INIT)))
        kind, fields = await self._read()
        assert kind == "ready", (kind, fields)
        return fields[0]

    async def run(self, code: str) -> dict:
        """pythonCallResults of running `code` (its globals)."""
        self._ids += 1
        raw = protocol.dumps({"op": "query", "object": {"code": code}}).encode()
        if _typed is None:
            self.writer.write(wire.pack_relay(self._ids, "reply-address", None, raw))
        else:
            self.writer.write(wire.encode(_typed.Relay(self._ids, "reply-address", None, raw)))
        while True:
            kind, fields = await self._read()
            if kind == "answered":
                return json.loads(fields[1])["body"]["pythonCallResults"]
            if kind == "done":
                return json.loads(fields[1])
            if kind in ("failed", "refused"):
                raise RuntimeError(f"the query failed: {fields}")

    async def ping(self, timeout: float) -> bool:
        """Whether the worker reads its pipe: it answers a Ping with at least an acknowledgement (see
        engine/liveness.py); older workers answer any message, so the declared health serves there."""
        ping = getattr(_typed, "Ping", None) if _typed is not None else None
        if _typed is None:
            self.writer.write(wire.pack(("health", True)))
        elif ping is None:
            self.writer.write(wire.encode(_typed.HealthChanged(True)))
        else:
            self.writer.write(wire.encode(ping()))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    kind, _ = await self._read()
                    if ping is None or kind == "ack":
                        return True
        except TimeoutError:
            return False

    async def _read(self) -> tuple[str, tuple]:
        if _typed is None:
            message = await asyncio.wait_for(wire.read(self.reader, trusted=False), 120)
            return message[0], tuple(message[1:])
        message = await asyncio.wait_for(wire.read(self.reader), 120)
        return type(message).__name__.lower(), tuple(message)

    def close(self) -> None:
        self.writer.close()


async def _spawned() -> tuple[WorkerClient, asyncio.subprocess.Process]:
    ours, theirs = socket.socketpair()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyexec_connector.engine.worker", str(theirs.fileno()), str(os.getpid()),
        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=clean_environment())
    theirs.close()
    client = WorkerClient(ours, proc.pid)
    await client.ready()
    return client, proc


async def _forked(zygote: Zygote) -> WorkerClient:
    worker = await zygote.fork_worker()
    client = WorkerClient(worker.sock, worker.pid)
    await client.ready()
    return client


def _pss(pids: list[int]) -> int:
    import psutil
    return sum(psutil.Process(pid).memory_full_info().pss for pid in pids)


async def main(preload: list[str], rounds: int, workers: int) -> dict:
    code = "".join(f"import {m}\n" for m in preload) + "ok = 1"
    zygote = Zygote(preload)
    started = time.perf_counter()
    await zygote.start()
    zygote_start = time.perf_counter() - started
    spawn_times, fork_times = [], []
    for _ in range(rounds):      # alternately: both see the same neighbours
        t0 = time.perf_counter()
        client, proc = await _spawned()
        await client.run(code)
        spawn_times.append(time.perf_counter() - t0)
        client.close()
        await asyncio.wait_for(proc.wait(), 30)
        t0 = time.perf_counter()
        forked = await _forked(zygote)
        await forked.run(code)
        fork_times.append(time.perf_counter() - t0)
        forked.close()
    spawned = [await _spawned() for _ in range(workers)]
    forks = [await _forked(zygote) for _ in range(workers)]
    for client in [c for c, _ in spawned] + forks:
        for _ in range(10):
            await client.run(code)
    await asyncio.sleep(0.5)
    pss_spawned = _pss([c.pid for c, _ in spawned])
    pss_one = _pss([spawned[0][0].pid])
    pss_forked = _pss([zygote.pid] + [c.pid for c in forks])
    for client, proc in spawned:
        client.close()
        await asyncio.wait_for(proc.wait(), 30)
    for client in forks:
        client.close()
    await zygote.stop()
    spawn_ms, fork_ms = statistics.median(spawn_times) * 1e3, statistics.median(fork_times) * 1e3
    mib = 2 ** 20
    return {
        "preload": preload, "rounds": rounds, "workers": workers, "zygote_start_ms": round(zygote_start * 1e3, 1),
        "first_reply_spawned_ms_p50": round(spawn_ms, 1), "first_reply_forked_ms_p50": round(fork_ms, 1),
        "forked_over_spawned": round(fork_ms / spawn_ms, 3),
        "pss_spawned_workers_mib": round(pss_spawned / mib, 1), "pss_one_spawned_mib": round(pss_one / mib, 1),
        "pss_zygote_and_forked_mib": round(pss_forked / mib, 1),
        "forked_total_over_one_spawned": round(pss_forked / pss_one, 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preload", action="append", default=None, help="a module to preload (repeatable)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.preload or ["pandas"], args.rounds, args.workers)), indent=2))

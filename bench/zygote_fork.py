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

import psutil

from pyexec_connector import protocol
from pyexec_connector.engine import wire
from pyexec_connector.engine.zygote import Zygote, clean_environment

_INIT = {"source_name": "bench", "server_config": {}, "healthy": True, "cache_capacity": 16, "forbid": (),
         "memory_limit_mb": None, "runtime_info": False, "max_message_bytes": None}


class _Client:
    """The connector's side of the worker protocol (as the process engine speaks it today)."""

    def __init__(self, sock: socket.socket, pid: int):
        self.sock, self.pid = sock, pid

    async def ready(self) -> None:
        self.reader, self.writer = await wire.open_pipe(self.sock, 2 ** 20, trusted=False)
        self.writer.write(wire.pack(("init", _INIT)))
        assert (await asyncio.wait_for(wire.read(self.reader, trusted=False), 120))[0] == "ready"

    async def query(self, code: str) -> None:
        raw = protocol.dumps({"op": "query", "object": {"code": code}}).encode()
        self.writer.write(wire.pack_relay(1, "bench", None, raw))
        while True:
            message = await asyncio.wait_for(wire.read(self.reader, trusted=False), 120)
            if message[0] in ("answered", "done"):
                return
            if message[0] in ("failed", "refused"):
                raise RuntimeError(f"the query failed: {message}")

    def close(self) -> None:
        self.writer.close()


async def _spawned() -> tuple[_Client, asyncio.subprocess.Process]:
    ours, theirs = socket.socketpair()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyexec_connector.engine.worker", str(theirs.fileno()), str(os.getpid()),
        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=clean_environment())
    theirs.close()
    client = _Client(ours, proc.pid)
    await client.ready()
    return client, proc


async def _forked(zygote: Zygote) -> _Client:
    worker = await zygote.fork_worker()
    client = _Client(worker.sock, worker.pid)
    await client.ready()
    return client


def _pss(pids: list[int]) -> int:
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
        await client.query(code)
        spawn_times.append(time.perf_counter() - t0)
        client.close()
        await asyncio.wait_for(proc.wait(), 30)
        t0 = time.perf_counter()
        forked = await _forked(zygote)
        await forked.query(code)
        fork_times.append(time.perf_counter() - t0)
        forked.close()
    spawned = [await _spawned() for _ in range(workers)]
    forks = [await _forked(zygote) for _ in range(workers)]
    for client in [c for c, _ in spawned] + forks:
        for _ in range(10):
            await client.query(code)
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

"""Overhead of process mode against inline mode: queries/s for trivial cached code, through the real
console command and devserver.py over loopback.

    python bench/engine_overhead.py [--seconds 5] [--workers N]

The connector runs as its own process (`pyexec-connector run`); this process is the Vantiq stand-in
and the client. Each mode is measured at concurrency 1 and 32, in one run, after a warm-up."""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
import time

from pyexec_connector.devserver import DevServer

SOURCE = "pythonSource"
TOKEN = "bench-token-0123456789abcdef"
TRIVIAL = {"code": "x = 1", "name": "trivial", "presetValues": {"a": 1}}


async def rate(server: DevServer, concurrency: int, seconds: float) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            result = await server.query(TRIVIAL, SOURCE, timeout=30)
            assert result.status == 200, result.body
            done += 1

    began = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done / (time.monotonic() - began)


def _write_config(url: str) -> str:
    workdir = tempfile.mkdtemp(prefix="pyexec-bench-")
    pathlib.Path(workdir, "server.config").write_text(f"targetServer={url}\nauthToken={TOKEN}\nsources={SOURCE}\n")
    return workdir


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=None, help="process mode workers (default: CPUs)")
    args = parser.parse_args()

    server = DevServer(token=TOKEN, sources=(SOURCE,))
    await server.start()
    first = {"executionMode": "inline"}
    server.set_source_config(SOURCE, first)
    workdir = _write_config(server.url)
    connector = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyexec_connector", "run", "--log-level", "WARNING", cwd=workdir)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        rows = []
        for mode in ("inline", "process"):
            general = {"executionMode": mode}
            if mode == "process" and args.workers:
                general["workers"] = args.workers
            await server.reconfigure(SOURCE, general)
            await rate(server, 32, 1.0)                      # warm-up: workers started, code cached
            for concurrency in (1, 32):
                rows.append((mode, concurrency, await rate(server, concurrency, args.seconds)))
        print(f"{'mode':8} {'concurrency':>11} {'queries/s':>10}")
        for mode, concurrency, qps in rows:
            print(f"{mode:8} {concurrency:>11} {qps:>10.0f}")
        by = {(m, c): q for m, c, q in rows}
        for c in (1, 32):
            print(f"process/inline at concurrency {c}: {by[('process', c)] / by[('inline', c)]:.2f}")
    finally:
        connector.terminate()
        await asyncio.wait_for(connector.wait(), 10)
        await server.stop()


if __name__ == "__main__":
    asyncio.run(main())

"""Per-script environments (docs/ENVIRONMENTS.md): what a query costs in a cached environment against the
same query in the base environment, measured alternately in one run through the real console command
(scriptDependencies on) and the devserver; and what a first use costs (one small wheel, no index).

    python -m bench.envs_query [--rounds 7] [--queries 400] [--concurrency 1,8]

Each round runs `queries` queries of `x = 1` at each concurrency, once plain and once with a PEP 723 block
whose environment is installed (the order alternates per round); the figure is the median of the rounds'
queries per second, and env/base their ratio."""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.wheels import make_wheel, script

from pyexec_connector.devserver import DevServer

SOURCE, TOKEN = "pythonSource", "bench-token"


async def _rate(server: DevServer, code: str, queries: int, concurrency: int) -> float:
    left = queries

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            reply = await server.query({"code": code}, timeout=60)
            if reply.status != 200:
                raise RuntimeError(f"query failed: {reply.body}")

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return queries / (time.perf_counter() - started)


async def main(rounds: int, queries: int, concurrencies: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_wheel(folder / "wheels", "tinyone", "1.0")
        server = DevServer(token=TOKEN, sources=(SOURCE,))
        await server.start()
        # as many workers as the base: a query in either runs on a warm worker
        server.set_source_config(SOURCE, {"workers": 2, "minWorkers": 2})
        (folder / "server.config").write_text(
            f"targetServer = {server.url}\nauthToken = {TOKEN}\nsources = {SOURCE}\nscriptDependencies = true\n"
            f"packageIndex = none\npackageFindLinks = {folder / 'wheels'}\nenvironmentsDir = {folder / 'envs'}\n")
        command = Path(sys.executable).parent / "pyexec-connector"
        proc = await asyncio.create_subprocess_exec(str(command), "--config", str(folder / "server.config"),
                                                    cwd=tmp, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)
        try:
            await server.wait_attached(SOURCE, timeout=60)
            base, env = "x = 1", script("tinyone") + "x = 1"
            started = time.perf_counter()
            first = await server.query({"code": env}, timeout=120)
            print(f"first use (install, zygote, worker, query): {time.perf_counter() - started:.2f} s "
                  f"-> {first.status}")
            for _ in range(3):     # warm both ways: workers of the env's engine forked, caches filled
                await _rate(server, base, queries // 4, max(concurrencies))
                await _rate(server, env, queries // 4, max(concurrencies))
            for concurrency in concurrencies:
                figures: dict[str, list[float]] = {"base": [], "env": []}
                for index in range(rounds):
                    order = (("base", base), ("env", env)) if index % 2 == 0 else (("env", env), ("base", base))
                    for name, code in order:
                        figures[name].append(await _rate(server, code, queries, concurrency))
                b, e = statistics.median(figures["base"]), statistics.median(figures["env"])
                print(f"c={concurrency}: base {b:.0f} q/s, env {e:.0f} q/s, env/base {e / b:.3f} "
                      f"(rounds: base {[round(x) for x in figures['base']]}, env {[round(x) for x in figures['env']]})")
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 60)
            await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--concurrency", default="1,8")
    args = parser.parse_args()
    os.environ.pop("CONNECTOR_AUTH_TOKEN", None)
    asyncio.run(main(args.rounds, args.queries, [int(c) for c in args.concurrency.split(",")]))

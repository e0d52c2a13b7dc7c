"""Process mode's pool sizes itself and watches its workers, through the real console command and the
stand-in server: `minWorkers` warm, more forked under concurrent load up to `workers`, back down after
`workerIdleSeconds`; a worker that its code left blocked is found by a ping and replaced, and the
queries sent to it that it never read are answered by another."""
from __future__ import annotations

import asyncio
import os
import sys

import psutil
import pytest

from .conftest import SOURCE, TOKEN, console_command, free_port
from .test_operations import Proc, config_text, get, samples

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process trees and /proc: Linux")


@pytest.fixture
async def connector(server, tmp_path):
    procs: list[Proc] = []

    async def start(port: int, **general) -> Proc:
        server.set_source_config(SOURCE, general)
        (tmp_path / "serverConfig").mkdir(exist_ok=True)
        (tmp_path / "serverConfig" / "server.config").write_text(config_text(server, TOKEN, metricsPort=port))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTOR_")}
        process = await asyncio.create_subprocess_exec(
            *console_command(), cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        proc = Proc(process)
        procs.append(proc)
        await server.wait_attached(SOURCE, timeout=60)
        return proc

    yield start
    for proc in procs:
        await proc.kill()


async def figure(port: int, name: str) -> float:
    """An engine metric of the source (`name` without the prefix and any _total)."""
    for (sample, labels), value in samples((await get(port, "/metrics"))[1]).items():
        if sample.removesuffix("_total") == f"pyexec_engine_{name}" and ("source", SOURCE) in labels:
            return value
    return 0.0


def worker_processes(connector_pid: int) -> int:
    """Processes under the connector, but for the zygote (a child of the connector whose children the
    forked workers are)."""
    children = psutil.Process(connector_pid).children(recursive=True)
    zygotes = [c for c in children if c.ppid() == connector_pid and c.children()]
    return len(children) - len(zygotes)


async def wait_until(check, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


async def test_workers_scale_up_under_concurrent_load_and_down_after_idle(server, connector):
    port = free_port()
    proc = await connector(port, workers=3, minWorkers=1, workerIdleSeconds=2, executionTimeout=60)
    assert (await server.query({"code": "warm = 1"}, SOURCE, timeout=60)).status == 200
    await wait_until(lambda: _is(figure(port, "workers_alive"), 1), 30)
    assert worker_processes(proc.proc.pid) == 1          # one warm worker, not `workers`

    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(worker_processes(proc.proc.pid))
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch())
    code = "import os, time\ntime.sleep(1.5)\npid = os.getpid()"     # holds its worker: synchronous
    results = await asyncio.gather(*(server.query({"code": code}, SOURCE, timeout=60) for _ in range(3)))
    watcher.cancel()
    assert [r.status for r in results] == [200] * 3
    assert len({r.results["pid"] for r in results}) == 3, "three queries at once ran in three workers"
    assert max(seen) == 3 and await figure(port, "workers_alive") == 3

    # beyond minWorkers, idle workers retire after workerIdleSeconds: back to one process
    await wait_until(lambda: _is(figure(port, "workers_alive"), 1), 30)
    assert worker_processes(proc.proc.pid) == 1
    assert await figure(port, "worker_idle_retired") == 2
    after = await server.query({"code": "x = 1"}, SOURCE, timeout=60)      # the warm one serves
    assert after.status == 200 and after.results["x"] == 1


async def _is(value, expected: float) -> bool:
    return await value == expected


async def test_a_worker_wedged_after_answering_is_replaced_and_queries_sent_to_it_are_answered(server, connector):
    port = free_port()
    await connector(port, workers=2, minWorkers=2, executionTimeout=60)
    await wait_until(lambda: _is(figure(port, "workers_alive"), 2), 30)
    # answers, and leaves behind a callback that then blocks its worker's loop in synchronous code
    wedge = "import asyncio, time\nasyncio.get_running_loop().call_later(0.2, time.sleep, 1000)\nx = 1"
    assert (await server.query({"code": wedge}, SOURCE, timeout=60)).status == 200
    await asyncio.sleep(0.5)
    results = await asyncio.gather(*(server.query({"code": f"n = {i}"}, SOURCE, timeout=45) for i in range(40)))
    assert [r.status for r in results] == [200] * 40, [r.body for r in results if r.status != 200]
    assert [r.results["n"] for r in results] == list(range(40))
    # answered long before the liveness ping finds the wedged worker (issue 20): it is replaced after
    await wait_until(lambda: _is(figure(port, "worker_wedged"), 1), 30)
    assert await figure(port, "queries_requeued") >= 1
    await wait_until(lambda: _is(figure(port, "workers_alive"), 2), 30)     # replaced


async def test_a_query_in_synchronous_code_longer_than_a_ping_is_not_taken_for_a_wedged_worker(server, connector):
    port = free_port()
    await connector(port, workers=1, minWorkers=1, executionTimeout=60)
    assert (await server.query({"code": "warm = 1"}, SOURCE, timeout=60)).status == 200
    # silent for 12 s: pinged after 5, unanswered for 5 more; but it runs the query it read
    result = await server.query({"code": "import time\ntime.sleep(12)\ndone = True"}, SOURCE, timeout=60)
    assert result.status == 200 and result.results["done"] is True, result.body
    assert await figure(port, "worker_wedged") == 0
    assert await figure(port, "worker_restarts") == 0

"""The zygote (engine/zygote.py) and process groups (engine/procgroup.py), with real processes: a spawned
template interpreter that preloads modules, forks workers that run the real worker runtime, reaps them
and reports their ends; killing a worker's group kills what its code started; nothing is left behind.

The zygote is not wired into the process engine yet (issue 10 rebuilds that engine): these tests speak
the worker protocol to a forked worker directly, through WorkerClient, the one place that knows it."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bench.zygote_fork import WorkerClient as _ProtocolClient

from pyexec_connector.engine import procgroup
from pyexec_connector.engine.zygote import (
    WARM_UP_QUERIES,
    ForkedWorker,
    PreloadError,
    Zygote,
    ZygoteError,
    ZygoteGone,
    ZygoteRegistry,
)

from .conftest import ROOT

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork, process groups and /proc: Linux")


class WorkerClient(_ProtocolClient):
    """A forked worker and the connector's side of the worker protocol (bench/zygote_fork.py has the one
    copy of that protocol knowledge)."""

    def __init__(self, worker: ForkedWorker):
        super().__init__(worker.sock, worker.pid)
        self.worker = worker

    async def start(self) -> int:
        return await self.ready()


def alive(pid: int) -> bool:
    """Not reaped yet (a zombie counts as alive: someone still owes it a wait)."""
    return Path(f"/proc/{pid}").exists()


def proc_file(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


def zombie_children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2:].split()
            if fields[0] == b"Z" and int(fields[1]) == pid:
                found.append(int(entry))
    return found


async def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        await asyncio.sleep(0.02)
    return not alive(pid)


@pytest.fixture
async def zygote():
    made: list[Zygote] = []

    async def make(preload=()):
        z = Zygote(preload)
        made.append(z)
        await z.start()
        return z

    yield make
    for z in made:
        await z.stop()


async def test_forked_worker_is_ready_fast_and_runs_queries(zygote):
    z = await zygote()
    times = []
    workers = []
    for _ in range(5):
        started = time.monotonic()
        workers.append(await z.fork_worker())
        times.append(time.monotonic() - started)
    # a spawned worker imports the runtime in its own fresh interpreter: several hundred ms here
    assert statistics.median(times) < 0.2, times
    client = WorkerClient(workers[0])
    assert await client.start() == workers[0].pid
    assert (await client.run("x = 6 * 7"))["x"] == 42
    assert os.getpgid(workers[0].pid) == workers[0].pid != os.getpgid(0)     # each leads its own group
    assert os.getpgid(z.pid) != os.getpgid(0)             # nor is the zygote in the connector's group
    assert proc_file(z.pid, "comm") == b"pyexec-zygote\n"
    assert proc_file(workers[0].pid, "comm") == b"pyexec-worker\n"    # its command line is the zygote's
    client.close()
    assert await asyncio.wait_for(workers[0].wait(), 10) == 0     # its end, reported by the zygote


async def test_the_zygote_warms_the_worker_runtime_up_and_keeps_nothing_of_it(zygote):
    # issue 11 (h1): the runtime's first queries run once in the zygote, so forks share what they write
    z = await zygote()
    assert z.warmed_up == WARM_UP_QUERIES
    links = [os.readlink(f"/proc/{z.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{z.pid}/fd")]
    assert sum(link.startswith("socket:") for link in links) == 1, links     # its control socket only
    client = WorkerClient(await z.fork_worker())
    await client.start()
    code = "import os, sys\nout = type(sys.stdout).__name__\npid = os.getpid()"
    assert await client.run(code) == {"out": "_Router", "pid": client.pid}


async def test_preloaded_module_is_in_sys_modules_before_the_code_runs(zygote):
    code = "import sys\nloaded = 'wave' in sys.modules"
    plain = WorkerClient(await (await zygote()).fork_worker())
    await plain.start()
    assert (await plain.run(code))["loaded"] is False        # the worker runtime does not import it
    preloaded = WorkerClient(await (await zygote(["wave"])).fork_worker())
    await preloaded.start()
    assert (await preloaded.run(code))["loaded"] is True


async def test_numpy_and_pandas_work_in_forked_workers(zygote):
    pytest.importorskip("pandas")
    z = await zygote(["numpy", "pandas"])
    code = ("import sys\nwarm = 'pandas' in sys.modules\nimport numpy as np\nimport pandas as pd\n"
            "total = int(pd.DataFrame({'a': np.arange(5)})['a'].sum())\ndraw = float(np.random.rand())")
    results = []
    for _ in range(2):
        client = WorkerClient(await z.fork_worker())
        await client.start()
        results.append(await client.run(code))
    assert [r["total"] for r in results] == [10, 10]
    assert all(r["warm"] for r in results)
    assert results[0]["draw"] != results[1]["draw"]       # numpy's global random state is each worker's own


async def test_a_failing_preload_is_reported_by_name_and_not_retried(tmp_path, monkeypatch):
    (tmp_path / "broken_model.py").write_text("raise RuntimeError('no weights file')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH")))))
    for module, reason in (("no_such_module_here", "ModuleNotFoundError"), ("broken_model", "no weights file")):
        z = Zygote(["json", module])
        with pytest.raises(PreloadError) as caught:
            await z.start()
        assert caught.value.module == module and module in str(caught.value) and reason in str(caught.value)
        assert "preload" in str(caught.value)
        assert z.returncode == 1 and not alive(z.pid)       # ended and reaped: no crash loop, no zombie
        with pytest.raises(ZygoteGone):
            await z.fork_worker()


async def test_killing_a_workers_group_kills_the_subprocess_its_code_started(zygote):
    z = await zygote()
    client = WorkerClient(await z.fork_worker())
    await client.start()
    sleeper = (await client.run("import subprocess\npid = subprocess.Popen(['sleep', '1000']).pid"))["pid"]
    assert os.getpgid(sleeper) == client.worker.pid
    assert client.worker.kill()
    assert await asyncio.wait_for(client.worker.wait(), 10) == -signal.SIGKILL
    assert await gone(sleeper), "the sleep outlived its worker"
    assert not client.worker.kill()      # its end was reported: its pid is no longer its to signal


async def test_a_worker_that_ends_by_itself_takes_its_subprocesses_along(zygote):
    z = await zygote()
    client = WorkerClient(await z.fork_worker())
    await client.start()
    sleeper = (await client.run("import subprocess\npid = subprocess.Popen(['sleep', '1000']).pid"))["pid"]
    client.close()                          # the connector let go of it: it ends on its own
    assert await asyncio.wait_for(client.worker.wait(), 10) == 0
    assert await gone(sleeper)              # killed with the group, and reaped by the zygote (subreaper)


async def test_stop_reaps_every_worker_and_what_they_started():
    z = Zygote()
    await z.start()
    clients = [WorkerClient(await z.fork_worker()) for _ in range(3)]
    for client in clients:
        await client.start()
    sleeper = (await clients[0].run("import subprocess\npid = subprocess.Popen(['sleep', '1000']).pid"))["pid"]
    await clients[1].run("import threading, time\nthreading.Thread(target=time.sleep, args=(1000,)).start()")
    pids = [c.worker.pid for c in clients]
    started = time.monotonic()
    await z.stop(grace=0.5)
    assert time.monotonic() - started < 10
    assert z.returncode == 0 and not z.alive
    assert all(c.worker.exited.done() for c in clients)
    for pid in [*pids, sleeper, z.pid]:
        assert await gone(pid, 2.0), f"{pid} left behind"
    assert zombie_children(os.getpid()) == []
    with pytest.raises(ZygoteGone):
        await z.fork_worker()


async def test_the_zygote_and_its_workers_never_see_the_token(zygote, monkeypatch):
    monkeypatch.setenv("CONNECTOR_AUTH_TOKEN", "secret-token-11")
    monkeypatch.setenv("CONNECTOR_RECONNECT_SECRET", "secret-reconnect-11")
    z = await zygote(["json"])
    client = WorkerClient(await z.fork_worker())
    await client.start()
    for pid in (z.pid, client.worker.pid):
        for name in ("environ", "cmdline"):
            assert b"secret-" not in proc_file(pid, name)
    found = await client.run("import os\nleaked = [k for k in os.environ if 'SECRET' in k or 'TOKEN' in k]")
    assert found["leaked"] == []


async def test_a_zygote_that_dies_fails_forks_and_takes_its_workers():
    z = Zygote()
    await z.start()
    client = WorkerClient(await z.fork_worker())
    await client.start()
    os.kill(z.pid, signal.SIGKILL)
    assert await asyncio.wait_for(client.worker.wait(), 10) is None     # nobody left to report its code
    assert await gone(client.worker.pid)
    with pytest.raises(ZygoteGone):
        await z.fork_worker()
    await z.stop()
    assert z.returncode == -signal.SIGKILL


async def test_equal_preload_lists_share_one_zygote():
    registry = ZygoteRegistry()
    try:
        first, second = await asyncio.gather(registry.acquire(["json"]), registry.acquire(("json",)))
        other = await registry.acquire([])
        assert first is second and first is not other
        assert set(registry.zygotes()) == {("json",), ()}
        await registry.release(first)
        assert first.alive                       # still used by the second source
        await registry.release(second)
        assert not first.alive and set(registry.zygotes()) == {()}
        with pytest.raises(PreloadError):
            await registry.acquire(["no_such_module_here"])
        assert set(registry.zygotes()) == {()}   # not kept: the next configure tries again
        os.kill(other.pid, signal.SIGKILL)
        assert await gone(other.pid)
        await asyncio.sleep(0.1)
        replacement = await registry.acquire([])
        assert replacement is not other and replacement.alive
    finally:
        await registry.close()
    assert not replacement.alive


def test_kill_group_refuses_what_is_not_a_workers_group():
    for pgid in (0, 1, -5):
        with pytest.raises(ValueError):
            procgroup.kill_group(pgid)
    assert procgroup.kill_group(2 ** 22 + 12345) is False      # no such group: nothing to do


async def test_a_fork_request_after_stop_is_refused():
    z = Zygote()
    with pytest.raises(ZygoteGone):
        await z.fork_worker()                # never started
    await z.start()
    await z.stop()
    with pytest.raises(ZygoteError):
        await z.fork_worker()


async def test_threads_a_preload_leaves_running_are_named(tmp_path, monkeypatch, caplog):
    (tmp_path / "threaded_loader.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(1000,), name='weights-loader',"
        " daemon=True).start()\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH")))))
    z = Zygote(["threaded_loader"])
    try:
        await z.start()
        assert z.threads == ("weights-loader",)
        assert "weights-loader" in caplog.text and "preload" in caplog.text
        client = WorkerClient(await z.fork_worker())      # still forks: the thread is just not in the worker
        await client.start()
        names = await client.run("import threading\nnames = [t.name for t in threading.enumerate()]")
        assert "weights-loader" not in names["names"]
    finally:
        await z.stop()


async def test_a_connector_killed_outright_takes_its_zygote_and_workers_along(tmp_path):
    script = tmp_path / "connector.py"
    script.write_text(
        "import asyncio\nfrom pyexec_connector.engine.zygote import Zygote\n"
        "async def main():\n"
        "    z = Zygote()\n    await z.start()\n    w = await z.fork_worker()\n"
        "    print(z.pid, w.pid, flush=True)\n    await asyncio.sleep(1000)\n"
        "asyncio.run(main())\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        zygote_pid, worker_pid = map(int, line.split())
    finally:
        proc.kill()
        await proc.wait()
    assert await gone(zygote_pid) and await gone(worker_pid)     # no one left holding a socket to nobody


async def test_a_forked_worker_is_watched_as_a_spawned_process_is(zygote):
    z = await zygote()
    worker = await z.fork_worker()
    assert worker.returncode is None
    worker.terminate()
    assert await asyncio.wait_for(worker.wait(), 10) == -signal.SIGTERM == worker.returncode
    worker.sock.close()


async def test_an_acquirer_that_gives_up_while_the_zygote_starts_leaves_nothing_running():
    registry = ZygoteRegistry()
    acquiring = asyncio.ensure_future(registry.acquire(["json"]))
    await asyncio.sleep(0.05)
    zygote = registry.zygotes()[("json",)]
    acquiring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acquiring
    assert registry.zygotes() == {}
    deadline = time.monotonic() + 30
    while (zygote.pid is None or zygote.alive) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert zygote.pid is not None and await gone(zygote.pid)


def test_the_standalone_fork_benchmark_runs():
    pytest.importorskip("psutil")
    done = subprocess.run([sys.executable, "-m", "bench.zygote_fork", "--preload", "json", "--rounds", "1",
                           "--workers", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["preload"] == ["json"] and figures["first_reply_forked_ms_p50"] > 0
    assert figures["pss_zygote_and_forked_mib"] > 0


def parent_of(pid: int) -> int:
    stat = proc_file(pid, "stat")
    return int(stat[stat.rindex(b")") + 2:].split()[1])


async def test_orphans_of_user_code_end_with_their_query_and_are_reaped(zygote):
    z = await zygote()
    client = WorkerClient(await z.fork_worker())
    await client.start()
    # sh starts sleep in the background and exits: the sleep is an orphan, as in the image-check scenario.
    # The worker is a subreaper: it adopts the orphan (not PID 1), and ends and reaps it with the query.
    found = await client.run("import subprocess\nout = subprocess.run(['sh', '-c', 'sleep 60 >/dev/null 2>&1 & "
                             "echo $!'], capture_output=True, text=True).stdout")
    orphan = int(found["out"])
    assert await gone(orphan, 10)              # no zombie either: gone from /proc means reaped
    assert zombie_children(client.worker.pid) == [] and zombie_children(z.pid) == []

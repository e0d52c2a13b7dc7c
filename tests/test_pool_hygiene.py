"""Process mode's workers, through the real console command and the stand-in server: forked from a
zygote that preloaded the source's modules, each in its own process group — so a signal to the
connector's group reaches the connector alone, and a worker killed on a timeout takes the processes its
code started along."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from .conftest import SOURCE, TOKEN, console_command
from .test_operations import SLEEPY, Proc, config_text
from .test_zygote import gone, proc_file

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups and /proc: Linux")


def proc_file_text(path: Path) -> str:
    return path.read_text()


@pytest.fixture
async def connector(server, tmp_path):
    """The console command as a process-group leader (its own session), as a shell or systemd starts it."""
    procs: list[Proc] = []

    async def start(**general) -> Proc:
        server.set_source_config(SOURCE, {"workers": 1, **general})
        (tmp_path / "serverConfig").mkdir(exist_ok=True)
        (tmp_path / "serverConfig" / "server.config").write_text(config_text(server, TOKEN))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTOR_")}
        process = await asyncio.create_subprocess_exec(
            *console_command(), cwd=tmp_path, env=env, start_new_session=True,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        proc = Proc(process)
        procs.append(proc)
        await server.wait_attached(SOURCE, timeout=60)
        return proc

    yield start
    for proc in procs:
        await proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_to_the_connectors_group_lets_the_query_in_flight_finish(server, connector, sig):
    proc = await connector()
    address = await server.send_query(SOURCE, {"code": SLEEPY})
    await server.wait_notifications(SOURCE, 1, timeout=30)      # the query is running in its worker
    os.killpg(proc.proc.pid, sig)                                # kill -- -PGID, Ctrl-C, systemd's default
    result = await server.replies_for(address, timeout=30)
    assert result.status == 200 and result.results["slept"] is True, result.body
    assert await proc.wait() == 0, proc.output


async def test_a_timed_out_query_leaves_no_subprocess_behind(server, connector, tmp_path):
    await connector(executionTimeout=1)
    pid_file = tmp_path / "sleeper.pid"
    code = (f"import subprocess, time\nopen({str(pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '1000']).pid))"
            "\ntime.sleep(1000)")
    result = await server.query({"code": code}, SOURCE, timeout=60)
    assert result.status == 400 and "execution.timeout" in str(result.body)
    sleeper = int(proc_file_text(pid_file))
    assert await gone(sleeper), "the sleep 1000 outlived its worker"
    again = await server.query({"code": "x = 1"}, SOURCE, timeout=60)      # served by a fresh fork
    assert again.status == 200 and again.results["x"] == 1


async def test_preloaded_modules_are_there_before_the_first_query(server, connector):
    await connector(preload=["wave", "colorsys"])
    result = await server.query({"code": "import sys\nloaded = ['wave' in sys.modules, 'colorsys' in sys.modules]"},
                                SOURCE, timeout=60)
    assert result.status == 200 and result.results["loaded"] == [True, True]


async def test_a_failing_preload_is_logged_by_name_and_queries_still_run(server, connector):
    proc = await connector(preload=["no_such_module_here"])
    result = await server.query({"code": "x = 2"}, SOURCE, timeout=60)
    assert result.status == 200 and result.results["x"] == 2
    await proc.wait_for_line("no_such_module_here")
    assert "preload" in proc.output


async def test_a_worker_killed_on_timeout_is_replaced_by_a_preloaded_fork(server, connector):
    await connector(preload=["wave"], executionTimeout=1)
    first = await server.query({"code": "import os\npid = os.getpid()"}, SOURCE, timeout=60)
    stuck = await server.query({"code": "import time\ntime.sleep(1000)"}, SOURCE, timeout=60)
    assert stuck.status == 400
    # its own timeout: with the source's 1 s it could pass while it waits for the stuck worker to be killed
    # (KILL_GRACE), and a query whose timeout passes while it waits is answered busy (issue 12)
    after = await server.query({"code": "import os, sys\npid = os.getpid()\nwarm = 'wave' in sys.modules",
                                "timeout": 30}, SOURCE, timeout=60)
    assert after.status == 200 and after.results["warm"] is True
    assert after.results["pid"] != first.results["pid"]
    assert proc_file(after.results["pid"], "comm") == b"pyexec-worker\n"     # forked from the zygote


async def test_recycling_by_query_count_and_memory_loses_no_query(server, start_connector):
    server.set_source_config(SOURCE, {"workers": 2, "maxQueriesPerWorker": 20})
    running = await start_connector()
    results = await asyncio.gather(*(server.query({"code": f"x = {i}"}, SOURCE, timeout=60) for i in range(300)))
    assert [r.status for r in results] == [200] * 300
    assert [r.results["x"] for r in results] == list(range(300))
    stats = running.session.engine.stats()
    assert stats.worker_recycles.get("queries", 0) >= 5, stats
    assert stats.worker_forks > 2


async def test_recycling_by_memory_loses_no_query(server, start_connector):
    server.set_source_config(SOURCE, {"workers": 2, "maxWorkerMemoryMB": 1})     # every worker is past 1 MiB
    running = await start_connector()
    results = await asyncio.gather(*(server.query({"code": f"y = {i}"}, SOURCE, timeout=120) for i in range(300)))
    assert [r.status for r in results] == [200] * 300
    assert [r.results["y"] for r in results] == list(range(300))
    assert running.session.engine.stats().worker_recycles.get("memory", 0) >= 5

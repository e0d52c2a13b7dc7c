"""engine/launch.py: a pool's one call for a new worker, forked from its zygote or spawned, in its own
process group either way, with real processes. (Not wired into the process engine yet: see zygote.py.)"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import pytest
from bench.zygote_fork import WorkerClient

from pyexec_connector.engine.launch import WorkerLauncher, spawn_worker
from pyexec_connector.engine.zygote import PreloadError, ZygoteRegistry

from .test_zygote import gone

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork, process groups and /proc: Linux")

SLEEPER = "import subprocess\npid = subprocess.Popen(['sleep', '1000']).pid"


async def test_a_spawned_worker_leads_its_group_and_dies_with_what_it_started(monkeypatch):
    monkeypatch.setenv("CONNECTOR_AUTH_TOKEN", "secret-token-11")
    launched = await spawn_worker()
    assert not launched.forked
    client = WorkerClient(launched.sock, launched.process.pid)
    assert await client.ready() == launched.process.pid
    assert os.getpgid(launched.process.pid) == launched.process.pid != os.getpgid(0)
    found = await client.run(SLEEPER + "\nimport os\ntoken = os.environ.get('CONNECTOR_AUTH_TOKEN')")
    assert found["token"] is None
    launched.process.kill()
    assert await asyncio.wait_for(launched.process.wait(), 10) == -signal.SIGKILL
    assert await gone(found["pid"])
    launched.process.kill()        # reaped: nothing is sent to a pid that may be another process's now
    client.close()


async def test_launchers_with_one_preload_list_fork_from_one_zygote():
    registry = ZygoteRegistry()
    first, second = WorkerLauncher(registry, ["wave"], "a"), WorkerLauncher(registry, ["wave"], "b")
    await asyncio.gather(first.open(), second.open())
    try:
        assert first.zygote is second.zygote is not None and first.problem is None
        launched = await first.launch()
        assert launched.forked and first.forks == 1 and first.spawns == 0
        client = WorkerClient(launched.sock, launched.process.pid)
        await client.ready()
        assert (await client.run("import sys\nwarm = 'wave' in sys.modules"))["warm"] is True
        sleeper = (await client.run(SLEEPER))["pid"]
        launched.process.kill()
        assert await asyncio.wait_for(launched.process.wait(), 10) == -signal.SIGKILL
        assert await gone(sleeper)
        client.close()
        zygote = first.zygote
        await first.close()
        assert zygote.alive                 # the other source still forks from it
        await second.close()
        assert not zygote.alive and registry.zygotes() == {}
    finally:
        await registry.close()


async def test_a_failing_preload_is_named_and_workers_are_spawned_instead(caplog):
    registry = ZygoteRegistry()
    launcher = WorkerLauncher(registry, ["json", "no_such_module_here"], "src")
    with caplog.at_level(logging.ERROR):
        await launcher.open()
    assert isinstance(launcher.problem, PreloadError) and launcher.problem.module == "no_such_module_here"
    assert "source src" in caplog.text and "no_such_module_here" in caplog.text and "preload" in caplog.text
    launched = await launcher.launch()
    assert not launched.forked and launcher.spawns == 1
    client = WorkerClient(launched.sock, launched.process.pid)
    await client.ready()
    assert (await client.run("x = 1"))["x"] == 1
    client.close()
    assert await asyncio.wait_for(launched.process.wait(), 30) == 0
    await launcher.close()
    assert registry.zygotes() == {}


async def test_a_dead_zygote_is_replaced_for_the_next_worker():
    registry = ZygoteRegistry()
    launcher = WorkerLauncher(registry, [], "src")
    await launcher.open()
    try:
        old = launcher.zygote
        os.kill(old.pid, signal.SIGKILL)
        assert await gone(old.pid)
        await asyncio.sleep(0.1)
        launched = await launcher.launch()
        assert launched.forked and launcher.zygote is not old and launcher.zygote.alive
        client = WorkerClient(launched.sock, launched.process.pid)
        await client.ready()
        client.close()
    finally:
        await launcher.close()
        await registry.close()

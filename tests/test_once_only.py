"""The once-only guarantee where user code fights it: code that swallows its cancellation still gets its
timeout reply at the deadline, and a fork of user code never answers a second time nor lives on as a
second connector or worker. The real command (for forks: the fork must be of the connector's own
process) or the real classes, over loopback websockets against devserver.py."""
from __future__ import annotations

import asyncio
import os

import pytest

from pyexec_connector import errors

from .conftest import SOURCE
from .test_operations import config_text, spawn  # noqa: F401 - spawn is a fixture

# Top-level await in a try/except BaseException loop: cancelling it does nothing. It ends by itself after
# about 3 s (so that close() is not kept waiting), with a 200 that must never be sent.
SWALLOWS_CANCEL = ("import asyncio, time\n"
                   "ends = time.monotonic() + 3\n"
                   "while time.monotonic() < ends:\n"
                   "    try:\n"
                   "        await asyncio.sleep(0.05)\n"
                   "    except BaseException:\n"
                   "        pass\n"
                   "late = True")


@pytest.mark.parametrize("mode", ["inline", "process"])
async def test_code_that_swallows_cancellation_is_answered_at_its_deadline(server, start_connector, mode):
    server.set_source_config(SOURCE, {"executionMode": mode, "workers": 1})
    running = await start_connector()
    loop = asyncio.get_running_loop()
    began = loop.time()
    result = await server.query({"code": SWALLOWS_CANCEL, "timeout": 0.3}, timeout=10)
    assert result.status == 400 and result.error_code == errors.TIMEOUT, result.replies
    assert loop.time() - began < 2.5            # not when the code ends by itself (3 s)
    await asyncio.sleep(3.5)                     # the code has ended (or its worker was killed) by now
    assert server.stray_replies == []            # its 200 never went out
    assert (await server.query({"code": "after = 1"})).results == {"after": 1}
    assert running.session.engine.stats().timeouts == 1


# The child of a fork returns to connector code right away (plain code) or after an await.
FORK_PLAIN = ("import os\n"
              "child = os.fork()\n"
              "who = 'child' if child == 0 else 'parent'")
FORK_AWAIT = ("import asyncio, os\n"
              "child = os.fork()\n"
              "await asyncio.sleep(0.2)\n"
              "who = 'child' if child == 0 else 'parent'")


def gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("mode", ["inline", "process"])
@pytest.mark.parametrize("code", [FORK_PLAIN, FORK_AWAIT], ids=["plain", "await"])
async def test_a_fork_of_user_code_never_answers_nor_lives_on(server, spawn, mode, code):  # noqa: F811
    server.set_source_config(SOURCE, {"executionMode": mode, "workers": 1})
    proc = await spawn(config=config_text(server))
    await server.wait_attached(SOURCE, timeout=30)
    result = await server.query({"code": code}, timeout=30)
    assert result.status == 200 and result.results["who"] == "parent", result.replies
    child = result.results["child"]
    async with asyncio.timeout(10):              # the child ended as soon as it was back in connector code
        while not gone_or_zombie(child):
            await asyncio.sleep(0.05)
    for n in range(10):                          # the parent still serves, each query once
        assert (await server.query({"code": "x = n", "presetValues": {"n": n}})).results["x"] == n
    await asyncio.sleep(0.3)
    assert server.stray_replies == []
    assert server.connects(SOURCE) == 1          # the child did not disturb the parent's websocket
    assert proc.proc.returncode is None
    assert os.getpid() not in (child,)

"""engine/liveness.py: when a silent worker is pinged, routed around, or killed (pure)."""
from __future__ import annotations

import asyncio

import pytest
from bench.zygote_fork import WorkerClient

from pyexec_connector.engine.liveness import LivenessPolicy, Verdict
from pyexec_connector.engine.zygote import Zygote

POLICY = LivenessPolicy(interval=5, timeout=2)


def test_a_worker_heard_from_recently_is_left_alone():
    assert POLICY.verdict(now=104, last_heard=100, pinged_at=None, running=0) is Verdict.FINE
    assert POLICY.next_check(now=104, last_heard=100, pinged_at=None) == 105


def test_a_silent_worker_is_pinged_and_an_answer_clears_it():
    assert POLICY.verdict(now=105, last_heard=100, pinged_at=None, running=3) is Verdict.PING
    assert POLICY.verdict(now=106, last_heard=100, pinged_at=105, running=3) is Verdict.FINE    # on its way
    assert POLICY.next_check(now=106, last_heard=100, pinged_at=105) == 107
    assert POLICY.verdict(now=108, last_heard=105.5, pinged_at=105, running=0) is Verdict.FINE  # answered


def test_an_unanswered_ping_wedges_an_idle_worker_and_only_routes_around_a_busy_one():
    assert POLICY.verdict(now=107, last_heard=100, pinged_at=105, running=0) is Verdict.WEDGED
    # a busy worker may be in honest synchronous code: its queries' timeouts judge it, not the ping
    assert POLICY.verdict(now=107, last_heard=100, pinged_at=105, running=1) is Verdict.SILENT
    assert POLICY.verdict(now=190, last_heard=100, pinged_at=105, running=0) is Verdict.WEDGED


@pytest.mark.parametrize("bad", [(0, 1), (1, 0), (-1, 5)])
def test_refuses_non_positive_times(bad):
    with pytest.raises(ValueError):
        LivenessPolicy(*bad)


async def test_a_ping_tells_a_reading_worker_from_one_its_code_left_blocked():
    zygote = Zygote()
    await zygote.start()
    try:
        clients = []
        for _ in range(2):
            worker = await zygote.fork_worker()
            clients.append(WorkerClient(worker.sock, worker.pid))
            await clients[-1].ready()
        healthy, wedged = clients
        # answers, and leaves behind a callback that blocks the worker's loop in synchronous code
        await wedged.run("import asyncio, time\nasyncio.get_running_loop().call_later(0.1, time.sleep, 1000)\nx = 1")
        await asyncio.sleep(0.3)
        assert await healthy.ping(5.0)
        assert not await wedged.ping(1.0)
        policy = LivenessPolicy(interval=5, timeout=1)
        assert policy.verdict(now=11.0, last_heard=0.0, pinged_at=10.0, running=0) is Verdict.WEDGED
    finally:
        await zygote.stop(grace=0)

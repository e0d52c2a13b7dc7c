"""WorkerPool tells its owner what happens to its workers as one stream of events (pool.events), and
calls nothing of its owner's: real worker processes, no engine."""
import asyncio
import signal

from pyexec_connector.engine.pool import NoWorkerStarts, WorkerEnded, WorkerPool, WorkerReady
from pyexec_connector.engine.scaling import ScalePolicy


def settings() -> dict:
    return {"source_name": "events", "server_config": {}, "healthy": True, "cache_capacity": 8, "forbid": (),
            "memory_limit_mb": 0, "queries_per_worker": 16}


async def next_event(events):
    async with asyncio.timeout(30):
        return await anext(events)


async def test_the_pool_streams_its_workers_readiness_and_ends_and_reaps_a_dead_one_at_once():
    pool = WorkerPool("events", ScalePolicy(1, 1, 60.0), settings, None)
    events = pool.events.follow()
    try:
        ready = await next_event(events)
        assert type(ready) is WorkerReady and ready.worker in pool.workers
        killed_at = asyncio.get_running_loop().time()
        ready.worker.proc.send_signal(signal.SIGKILL)
        ended = await next_event(events)
        assert type(ended) is WorkerEnded and ended.worker is ready.worker and "SIGKILL" in ended.what
        # reaped as soon as it ended, not at the next tick
        assert asyncio.get_running_loop().time() - killed_at < 0.4
        assert ended.worker not in pool.workers and pool.restarts == 1
        again = await next_event(events)      # minWorkers: it is replaced
        assert type(again) is WorkerReady and again.worker is not ready.worker
    finally:
        await pool.stop()
    async with asyncio.timeout(5):
        assert [e async for e in events if type(e) is NoWorkerStarts] == []     # the stream ends with the pool


async def test_a_query_that_waits_gets_its_worker_or_its_busy_error_through_its_ticket_with_no_engine():
    """The Dispatcher calls nothing either: a waiting query's ticket resolves to the worker reserved for
    it, and a query refused later (the queue failed) gets the error through its ticket."""
    from pyexec_connector.engine.dispatch import Dispatcher
    from pyexec_connector.errors import QueryError

    pool = WorkerPool("events", ScalePolicy(1, 1, 60.0), settings, None)
    events = pool.events.follow()
    try:
        ready = await next_event(events)
        assert type(ready) is WorkerReady
        dispatcher = Dispatcher(pool, 16, None, 1 << 20)
        ticket = dispatcher.wait(1024, None)
        async with asyncio.timeout(10):
            worker = await ticket
        assert worker is ready.worker and worker.reserved == 1 and dispatcher.depth == 0
        worker.reserved -= 1
        while worker.credit:           # every run it asked for is promised: the next query waits
            worker.reserved += 1
        waiting = dispatcher.wait(1024, None)
        assert not waiting.done() and dispatcher.depth == 1
        dispatcher.fail_waiting(QueryError("io.vantiq.test.busy", "no worker"))
        async with asyncio.timeout(10):
            error = await asyncio.gather(waiting, return_exceptions=True)
        assert isinstance(error[0], QueryError) and dispatcher.depth == 0
    finally:
        await pool.stop()

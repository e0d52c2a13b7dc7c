"""Queries waiting for a worker are queued by cost (dispatch.py): bursts upstream absorbs are answered,
"busy" only past maxQueuedBytes, an explicit maxQueuedQueries, or a query's whole timeout spent waiting.
Through the real connector, its worker processes and devserver.py."""
import asyncio

from pyexec_connector import errors
from pyexec_connector.config import DEFAULT_MAX_QUEUED_BYTES, SourceConfig

from .conftest import SOURCE

SLOW = "import asyncio\nawait asyncio.sleep(delay)\ndone = True"


async def start(server, start_connector, **general):
    server.set_source_config(SOURCE, {"executionMode": "process", **general})
    running = await start_connector()
    assert (await server.query({"code": "warm = 1"}, timeout=30)).results == {"warm": 1}
    return running


def stats(running):
    return running.session.engine.stats()


def test_defaults_queue_by_bytes_with_no_count_cap():
    config = SourceConfig()
    assert config.maxQueuedQueries is None
    assert config.maxQueuedBytes == DEFAULT_MAX_QUEUED_BYTES == 64 * 1024 * 1024


async def test_a_burst_of_5000_trivial_queries_gets_no_busy(server, start_connector):
    running = await start(server, start_connector)     # the default config: a worker per core
    addresses = [await server.send_query(SOURCE, {"code": "x = 1"}) for _ in range(5000)]
    results = await asyncio.gather(*(server.replies_for(a, timeout=120) for a in addresses))
    statuses = [r.status for r in results]
    assert statuses.count(200) == 5000, {s: statuses.count(s) for s in set(statuses)}
    assert stats(running).busy == 0
    assert stats(running).queue_depth == 0 and stats(running).queued_bytes == 0


async def test_busy_past_the_byte_budget_names_the_key(server, start_connector):
    running = await start(server, start_connector, workers=1, queriesPerWorker=1, maxQueuedBytes=8192)
    first = await server.send_query(SOURCE, {"code": SLOW, "presetValues": {"delay": 1.0}})
    await asyncio.sleep(0.2)
    padding = "#" + "p" * 2000 + "\n"          # ~3 KiB a waiting query: the third does not fit in 8 KiB
    waiting = [await server.send_query(SOURCE, {"code": padding + f"n = {i}"}) for i in range(2)]
    busy = await server.query({"code": padding + "n = 2"})
    assert busy.status == 400 and busy.error_code == errors.BUSY
    assert "maxQueuedBytes" in busy.body["messageTemplate"] and 8192 in busy.body["parameters"]
    assert (await server.replies_for(first)).results["done"] is True
    assert [(await server.replies_for(a)).results["n"] for a in waiting] == [0, 1]
    assert stats(running).busy == 1 and stats(running).queued_bytes == 0


async def test_a_query_whose_timeout_passes_while_it_waits_is_answered_busy(server, start_connector):
    running = await start(server, start_connector, workers=1, queriesPerWorker=1, executionTimeout=0.5)
    # the worker is held for 2 s by a query with its own, longer timeout
    first = await server.send_query(SOURCE, {"code": SLOW, "presetValues": {"delay": 2.0}, "timeout": 10})
    await asyncio.sleep(0.2)
    waited = await server.query({"code": "x = 1"}, timeout=10)      # the source's 0.5 s: spent waiting
    assert waited.status == 400 and waited.error_code == errors.BUSY
    assert "did not start" in waited.body["messageTemplate"]
    assert server.received(first) == 0          # answered while the first still ran
    assert (await server.replies_for(first)).results["done"] is True
    assert stats(running).busy_waited_timeout == 1
    assert (await server.query({"code": "after = 1"})).results == {"after": 1}


async def test_an_explicit_max_queued_queries_still_caps_the_count(server, start_connector):
    running = await start(server, start_connector, workers=1, queriesPerWorker=1, maxQueuedQueries=2)
    first = await server.send_query(SOURCE, {"code": SLOW, "presetValues": {"delay": 1.0}})
    await asyncio.sleep(0.2)
    waiting = [await server.send_query(SOURCE, {"code": f"n = {i}"}) for i in range(2)]
    busy = await server.query({"code": "n = 2"})
    assert busy.status == 400 and busy.error_code == errors.BUSY
    assert "maxQueuedQueries" in busy.body["messageTemplate"] and 2 in busy.body["parameters"]
    assert (await server.replies_for(first)).results["done"] is True
    assert [(await server.replies_for(a)).results["n"] for a in waiting] == [0, 1]
    assert stats(running).busy == 1


async def test_a_query_waiting_for_a_fork_is_not_counted_by_max_queued_queries(server, start_connector):
    # below `workers`, a query that finds the warm worker busy waits for a fork of its own: not "busy"
    await start(server, start_connector, workers=2, minWorkers=1, maxQueuedQueries=0)
    first = await server.send_query(SOURCE, {"code": SLOW, "presetValues": {"delay": 1.0}})
    await asyncio.sleep(0.2)
    second = await server.query({"code": "n = 2"}, timeout=30)
    assert second.status == 200 and second.results == {"n": 2}, second.body
    assert (await server.replies_for(first)).results["done"] is True

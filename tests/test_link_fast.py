"""The fast paths of the link and the process engine: each message taken in the step its bytes came in
(linksocket.LinkSocket's one read path), a worker's replies written in the step they came
(SourceLink.write_now) and in batches, and timeouts checked by one sweep (pipeline.Deadlines). The real
connector over real loopback websockets against devserver.py; what the link did is read from
SourceLink.counters and the engine's stats()."""
from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest

from pyexec_connector import errors
from pyexec_connector.engine import process
from pyexec_connector.link import LinkState

from .conftest import SOURCE

SLEEPER = "import asyncio\nawait asyncio.sleep(5)"


def query_text(address: str, params: dict) -> str:
    """A query frame as devserver.send_query builds it."""
    return json.dumps({"op": "query", "resourceName": "sources", "resourceId": SOURCE, "object": params,
                       "messageHeaders": {"REPLY_ADDR_HEADER": address}})


def configure_text(general: dict) -> str:
    """A configureExtension frame as devserver._send_configure builds it."""
    return json.dumps({"op": "configureExtension", "resourceName": "sources", "resourceId": SOURCE,
                       "object": {"config": {"pythonExecConfig": {"general": general}}}})


def expect(server, address: str) -> str:
    return server.expect(address)


async def start(server, start_connector, mode: str, **properties):
    server.set_source_config(SOURCE, {"executionMode": mode, "workers": 1})
    running = await start_connector(**properties)
    # a first query: in process mode it waits for the worker, so that the next ones can be relayed
    assert (await server.query({"code": "warm = 1"})).results == {"warm": 1}
    return running


async def eventually(predicate, timeout: float = 2.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# ---- 1a. a configure and the query right after it, in one burst ----------------------------------

@pytest.mark.parametrize(("first", "then", "in_connector"), [
    ("process", "inline", True),     # the query must not be relayed to the old pool's worker
    ("inline", "process", False),
])
async def test_query_right_after_a_configure_runs_under_the_new_mode(server, start_connector, first, then,
                                                                     in_connector):
    running = await start(server, start_connector, first)
    address = expect(server, "after-mode")
    await server.send_raw(SOURCE, configure_text({"executionMode": then, "workers": 1}))
    await server.send_raw(SOURCE, query_text(address, {"code": "import os\npid = os.getpid()"}))
    result = await server.replies_for(address, timeout=10)
    assert result.status == 200, result.body
    assert (result.results["pid"] == os.getpid()) is in_connector
    assert running.session.source_config.executionMode == then
    assert running.session.link.reconnects == 0


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_query_right_after_a_configure_gets_the_new_runtime_information(server, start_connector, mode):
    await start(server, start_connector, mode)
    plain = await server.query({"code": "x = 1"})
    assert "connectorRuntimeInfo" not in plain.body
    address = expect(server, "after-runtime-info")
    await server.send_raw(SOURCE, configure_text({"executionMode": mode, "workers": 1,
                                                  "returnRuntimeInformation": True}))
    await server.send_raw(SOURCE, query_text(address, {"code": "x = 2"}))
    result = await server.replies_for(address)
    assert result.status == 200 and result.results == {"x": 2}
    assert "connectorRuntimeInfo" in result.body


# ---- 1b. over maxMessageBytes: refused unread ------------------------------------------------

@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_query_over_the_limit_still_gets_too_large_and_the_link_stays(server, start_connector, mode):
    running = await start(server, start_connector, mode, maxMessageBytes=64 * 1024)
    # under the 4x socket ceiling; were it run, its results ({"x": 1}) would fit
    big = {"code": "x = 1", "presetValues": {"blob": "b" * (100 * 1024)}, "limitReturnTo": ["x"]}
    result = await server.query(big)
    assert result.status == 400 and result.error_code == errors.TOO_LARGE
    assert result.body["messageTemplate"].startswith("The query is")      # refused unread, not run
    size, limit = result.body["parameters"]
    assert limit == 64 * 1024 and size > 100 * 1024
    assert (await server.query({"code": "after = 1"})).results == {"after": 1}
    assert running.session.link.reconnects == 0 and server.connects(SOURCE) == 1


# ---- 1c. non-query frames while ready: in order with the queries ---------------------------------------------

async def test_non_query_frames_while_ready_go_the_normal_way(server, start_connector, caplog):
    running = await start(server, start_connector, "process")
    counters = running.session.link.counters
    caplog.set_level(logging.INFO, logger="pyexec_connector.link")
    cut = expect(server, "cut-1")
    after = expect(server, "after-junk")
    # one burst: each frame is taken in its turn
    await server.send_raw(SOURCE, '{"op": "publish", "object": {"a": 1}}')
    await server.send_raw(SOURCE, '{"op": "mystery"}')
    await server.send_raw(SOURCE, '{"status": 500, "body": [{"code": "boom.code", "message": "boom"}]}')
    await server.send_raw(SOURCE, '{"op": "query", "messageHeaders": {"REPLY_ADDR_HEADER": "cut-1"}, "object": {')
    await server.send_raw(SOURCE, query_text(after, {"code": "alive = True"}))
    assert (await server.replies_for(cut)).error_code == errors.BAD_QUERY
    assert (await server.replies_for(after)).results == {"alive": True}
    messages = [r.getMessage() for r in caplog.records if r.name == "pyexec_connector.link"]
    assert any("ignored a publish" in m for m in messages)
    assert any("skipped a frame" in m and "mystery" in m for m in messages)
    assert any("reported status 500" in m and "boom" in m for m in messages)
    assert any("unreadable query cut-1" in m for m in messages)
    assert counters.queries == 2                 # the warm-up query and the one behind the junk
    assert counters.held == 0                    # the outbox had room: nothing waited
    assert running.session.link.reconnects == 0


# ---- 1d. queries and configures on the one read path -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_queries_are_taken_as_they_come_and_a_configure_applies_to_the_next(server, start_connector, mode):
    running = await start(server, start_connector, mode)
    counters = running.session.link.counters
    taken_before = counters.queries
    assert taken_before >= 1                        # the warm-up query
    answers = await asyncio.gather(*(server.query({"code": f"x = {i}"}) for i in range(10)))
    assert [a.results["x"] for a in answers] == list(range(10))
    assert counters.queries == taken_before + 10 and counters.held == 0
    await server.reconfigure(SOURCE, {"executionMode": mode, "workers": 1, "returnRuntimeInformation": True})
    assert await eventually(lambda: running.session.source_config.returnRuntimeInformation)
    result = await server.query({"code": "y = 1"})
    assert result.results == {"y": 1} and "connectorRuntimeInfo" in result.body
    assert counters.queries == taken_before + 11


# ---- 1e. after a reconnect ----------------------------------------------------------------------

@pytest.mark.parametrize("abrupt", [False, True])
async def test_a_new_connection_takes_queries_the_same_way(server, start_connector, abrupt):
    running = await start(server, start_connector, "process")
    counters = running.session.link.counters
    await server.drop(SOURCE, abrupt=abrupt)
    await server.wait_attached(SOURCE)
    await running.connector.wait_ready(timeout=5)
    assert await eventually(lambda: running.session.link.reconnects == 1)
    assert await eventually(lambda: running.session.link.ready)
    taken = counters.queries
    answers = await asyncio.gather(*(server.query({"code": f"x = {i}"}) for i in range(5)))
    assert [a.results["x"] for a in answers] == list(range(5))
    assert counters.queries == taken + 5 and counters.held == 0
    assert server.connects(SOURCE) == 2


# ---- 2. SourceLink.write_now: a worker's replies written in the step they came --------------------

async def test_a_burst_of_100_queries_is_answered_once_each(server, start_connector):
    running = await start(server, start_connector, "process")
    counters = running.session.link.counters
    writes_before = counters.writes
    addresses = [await server.send_query(SOURCE, {"code": "y = x * 2", "presetValues": {"x": i}})
                 for i in range(100)]
    results = await asyncio.gather(*(server.replies_for(a) for a in addresses))
    for i, result in enumerate(results):
        assert len(result.replies) == 1, result.replies
        assert result.status == 200 and result.results == {"x": i, "y": 2 * i}
    await asyncio.sleep(0.1)       # a duplicate would come after the terminal reply: nobody waits for it
    assert server.stray_replies == []
    assert counters.writes - writes_before < 100    # in batches, not a socket write per reply
    assert running.session.link.pending_frames == 0


async def test_a_burst_of_streaming_queries_keeps_each_querys_replies_in_order(server, start_connector):
    running = await start(server, start_connector, "process")
    code = ("async def go():\n"
            "    for n in range(3):\n"
            "        await connector_connection.send_query_response(connector_context, 100, {'n': n, 'q': q})\n"
            "    await connector_connection.send_query_response(connector_context, 200, {'n': 3, 'q': q})\n"
            "await go()")
    addresses = [await server.send_query(SOURCE, {"code": code, "codeHandlesReturn": True,
                                                  "presetValues": {"q": i}}) for i in range(40)]
    results = await asyncio.gather(*(server.replies_for(a) for a in addresses))
    for i, result in enumerate(results):
        assert [r["status"] for r in result.replies] == [100, 100, 100, 200]
        assert [r["body"] for r in result.replies] == [{"n": n, "q": i} for n in range(4)]
    await asyncio.sleep(0.1)
    assert server.stray_replies == []
    assert running.session.link.reconnects == 0


# ---- 3. timeouts: one sweep while queries with a timeout run ------------------------------------

async def test_a_query_over_its_timeout_is_answered_with_the_timeout_error(server, start_connector):
    running = await start(server, start_connector, "process")
    engine = running.session.engine
    assert isinstance(engine, process.ProcessEngine)
    loop = asyncio.get_running_loop()
    began = loop.time()
    result = await server.query({"code": SLEEPER, "timeout": 0.3}, timeout=3)
    assert loop.time() - began < 3
    assert result.status == 400 and result.error_code == errors.TIMEOUT
    assert engine.stats().timeouts == 1
    assert await eventually(lambda: not engine.stats().timeouts_pending)
    assert (await server.query({"code": "after = 1"})).results == {"after": 1}


async def test_the_configured_execution_timeout_applies_to_relayed_queries(server, start_connector):
    server.set_source_config(SOURCE, {"executionMode": "process", "workers": 1, "executionTimeout": 0.3})
    running = await start_connector()
    assert (await server.query({"code": "warm = 1"})).results == {"warm": 1}
    engine = running.session.engine
    relayed = engine.stats().relayed
    result = await server.query({"code": SLEEPER}, timeout=3)
    assert engine.stats().relayed == relayed + 1
    assert result.status == 400 and result.error_code == errors.TIMEOUT
    assert engine.stats().timeouts == 1
    assert await eventually(lambda: not engine.stats().timeouts_pending)


async def test_queries_with_different_timeouts_at_once_each_get_the_right_answer(server, start_connector):
    running = await start(server, start_connector, "process")
    engine = running.session.engine
    short = await server.send_query(SOURCE, {"code": SLEEPER, "timeout": 0.2})
    longer = await server.send_query(SOURCE, {"code": SLEEPER, "timeout": 0.6})
    in_time = await server.send_query(SOURCE, {"code": "import asyncio\nawait asyncio.sleep(0.2)\nok = 1",
                                               "timeout": 0.6})
    untimed = await server.send_query(SOURCE, {"code": "quick = 1"})
    order: list[str] = []

    async def collect(name, address):
        result = await server.replies_for(address, timeout=3)
        order.append(name)
        return result

    results = await asyncio.gather(collect("short", short), collect("longer", longer),
                                   collect("in_time", in_time), collect("untimed", untimed))
    short_r, longer_r, in_time_r, untimed_r = results
    assert short_r.error_code == errors.TIMEOUT and short_r.body["parameters"] == [0.2]
    assert longer_r.error_code == errors.TIMEOUT and longer_r.body["parameters"] == [0.6]
    assert in_time_r.status == 200 and in_time_r.results == {"ok": 1}
    assert untimed_r.status == 200 and untimed_r.results == {"quick": 1}
    assert order.index("short") < order.index("longer")
    assert engine.stats().timeouts == 2
    assert await eventually(lambda: not engine.stats().timeouts_pending)
    assert (await server.query({"code": "after = 1"})).results == {"after": 1}


async def test_the_writer_survives_write_now_sending_what_it_waited_to_send(server, start_connector):
    """Frames queued while the link attaches again (after reconnectRequired) wait for it; write_now() may
    send them in the step the link becomes ready, before the writer task runs: the writer must find the
    outbox empty and wait again, not fail (it did: an IndexError ended it, and later frames stayed queued
    for good)."""
    running = await start(server, start_connector, "inline")
    link = running.session.link
    server.configure_delay = 0.3
    await server.request_reconnect(SOURCE)
    assert await eventually(lambda: link.state is LinkState.ATTACHING)
    link.send(json.dumps({"op": "notification", "resourceName": "sources", "resourceId": SOURCE,
                          "object": {"n": 1}}))
    async with asyncio.timeout(5):
        while not link.ready:           # the writer waits for the link; write_now() tries in every step
            link.write_now()
            await asyncio.sleep(0)
    link.write_now()                    # the step the link became ready: it may send the queued frame
    await asyncio.sleep(0.05)
    link.send(json.dumps({"op": "notification", "resourceName": "sources", "resourceId": SOURCE,
                          "object": {"n": 2}}))
    await server.wait_notifications(SOURCE, 2, timeout=5)
    assert sorted(n["n"] for n in server.notifications[SOURCE]) == [1, 2]
    assert link.pending_frames == 0
    assert (await server.query({"code": "after = 1"})).results == {"after": 1}


async def test_a_failing_socket_write_costs_the_socket_not_the_replies(server, start_connector, monkeypatch):
    """write_now() runs inside a worker pipe's data_received: a write that fails must leave the pipe up,
    the link reconnects, and the replies queued meanwhile go out on the next socket, once each."""
    from pyexec_connector.websocket import ClientWebSocket

    running = await start(server, start_connector, "process")
    link = running.session.link
    send_texts = ClientWebSocket.send_texts
    failures = []

    def fails_once(self, frames):
        if not failures:
            failures.append(1)
            raise RuntimeError("socket write broken on purpose")
        return send_texts(self, frames)

    monkeypatch.setattr(ClientWebSocket, "send_texts", fails_once)
    results = await asyncio.gather(*(server.query({"code": "y = x + 1", "presetValues": {"x": i}}, timeout=10)
                                     for i in range(3)))
    assert [r.results for r in results] == [{"x": i, "y": i + 1} for i in range(3)]
    assert failures == [1] and link.reconnects == 1
    await asyncio.sleep(0.1)
    assert server.stray_replies == []
    assert (await server.query({"code": "after = 1"})).results == {"after": 1}

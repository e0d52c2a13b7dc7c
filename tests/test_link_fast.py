"""The fast paths of the link and the process engine: queries taken as websockets parses them
(_LinkConnection / SourceLink._message_now), a worker's replies written in the step they came
(SourceLink.write_now), and timeouts checked by one sweep (ProcessEngine._sweep). The real connector over
real loopback websockets against devserver.py."""
from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest

from pyexec_connector import errors
from pyexec_connector.engine import process
from pyexec_connector.link import SourceLink

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
    """Let replies_for() collect the replies to a query frame sent with send_raw()."""
    server._replies[address] = asyncio.Queue()
    return address


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


class MessageNowCounter:
    """SourceLink._message_now wrapped at class level (before the connector connects: each connection
    captures the bound method when the link becomes ready): (op, returned) of every call."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str | None, bool]] = []
        original = SourceLink._message_now
        calls = self.calls

        def message_now(link, raw):
            taken = original(link, raw)
            try:
                op = json.loads(bytes(raw)).get("op")
            except (ValueError, AttributeError):
                op = None
            calls.append((op, taken))
            return taken

        monkeypatch.setattr(SourceLink, "_message_now", message_now)

    def count(self, op: str | None, taken: bool) -> int:
        return self.calls.count((op, taken))


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


# ---- 1b. over maxMessageBytes: left to _receive ------------------------------------------------

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


# ---- 1c. non-query frames while ready: the normal path ---------------------------------------------

async def test_non_query_frames_while_ready_go_the_normal_way(server, start_connector, caplog, monkeypatch):
    counter = MessageNowCounter(monkeypatch)
    running = await start(server, start_connector, "process")
    caplog.set_level(logging.INFO, logger="pyexec_connector.link")
    cut = expect(server, "cut-1")
    after = expect(server, "after-junk")
    # one burst: each junk frame is left to recv(), and the query behind them waits its turn
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
    # only the first frame of the burst is offered to the direct path (the others queue behind it)
    assert [op for op, taken in counter.calls if taken] == ["query"]     # the warm-up query
    assert counter.count("publish", False) == 1
    assert running.session.link.reconnects == 0


# ---- 1d. the direct path is the one used -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_plain_queries_take_the_direct_path_and_a_configure_does_not(server, start_connector, mode,
                                                                           monkeypatch):
    counter = MessageNowCounter(monkeypatch)
    running = await start(server, start_connector, mode)
    taken_before = counter.count("query", True)
    assert taken_before >= 1                        # the warm-up query
    answers = await asyncio.gather(*(server.query({"code": f"x = {i}"}) for i in range(10)))
    assert [a.results["x"] for a in answers] == list(range(10))
    assert counter.count("query", True) == taken_before + 10
    assert counter.count("query", False) == 0
    await server.reconfigure(SOURCE, {"executionMode": mode, "workers": 1, "returnRuntimeInformation": True})
    assert await eventually(lambda: running.session.source_config.returnRuntimeInformation)
    assert counter.count("configureExtension", False) == 1
    assert counter.count("configureExtension", True) == 0
    result = await server.query({"code": "y = 1"})
    assert result.results == {"y": 1} and "connectorRuntimeInfo" in result.body
    assert counter.count("query", True) == taken_before + 11


# ---- 1e. after a reconnect ----------------------------------------------------------------------

@pytest.mark.parametrize("abrupt", [False, True])
async def test_a_new_connection_gets_the_direct_path_again(server, start_connector, monkeypatch, abrupt):
    counter = MessageNowCounter(monkeypatch)
    running = await start(server, start_connector, "process")
    first_ws = running.session.link._ws
    await server.drop(SOURCE, abrupt=abrupt)
    await server.wait_attached(SOURCE)
    await running.connector.wait_ready(timeout=5)
    assert await eventually(lambda: running.session.link.reconnects == 1)
    ws = running.session.link._ws
    assert ws is not None and ws is not first_ws
    assert await eventually(lambda: ws.on_message is not None)
    taken = counter.count("query", True)
    answers = await asyncio.gather(*(server.query({"code": f"x = {i}"}) for i in range(5)))
    assert [a.results["x"] for a in answers] == list(range(5))
    assert counter.count("query", True) == taken + 5
    assert server.connects(SOURCE) == 2


# ---- 2. SourceLink.write_now: a worker's replies written in the step they came --------------------

class WriteCounter:
    """Counts the writes to the link socket's transport, and the direct writer's calls."""

    def __init__(self, link: SourceLink):
        self.writes = 0
        self.direct = 0
        self.direct_wrote = 0
        transport = link._ws.transport
        write = transport.write

        def counting_write(data):
            self.writes += 1
            return write(data)

        transport.write = counting_write
        direct = link._write_now
        assert direct is not None, "the writer task made no direct writer for this socket"

        def counting_direct():
            self.direct += 1
            wrote = direct()
            self.direct_wrote += bool(wrote)
            return wrote

        link._write_now = counting_direct


async def test_a_burst_of_100_queries_is_answered_once_each(server, start_connector):
    running = await start(server, start_connector, "process")
    writes = WriteCounter(running.session.link)
    addresses = [await server.send_query(SOURCE, {"code": "y = x * 2", "presetValues": {"x": i}})
                 for i in range(100)]
    results = await asyncio.gather(*(server.replies_for(a) for a in addresses))
    for i, result in enumerate(results):
        assert len(result.replies) == 1, result.replies
        assert result.status == 200 and result.results == {"x": i, "y": 2 * i}
    await asyncio.sleep(0.1)       # a duplicate would come after the terminal reply: nobody waits for it
    assert server.stray_replies == []
    assert writes.direct_wrote >= 1                 # the worker's answers went out in the step they came
    assert writes.writes < 100                      # and in batches, not a socket write per reply
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
    assert engine.stats()["timeouts"] == 1
    assert await eventually(lambda: engine._sweeping is None)
    assert (await server.query({"code": "after = 1"})).results == {"after": 1}


async def test_the_configured_execution_timeout_applies_to_relayed_queries(server, start_connector):
    server.set_source_config(SOURCE, {"executionMode": "process", "workers": 1, "executionTimeout": 0.3})
    running = await start_connector()
    assert (await server.query({"code": "warm = 1"})).results == {"warm": 1}
    engine = running.session.engine
    relayed = []
    relay = engine.relay

    def counting_relay(frame, channel):
        query = relay(frame, channel)
        relayed.append(query is not None)
        return query

    engine.relay = counting_relay
    result = await server.query({"code": SLEEPER}, timeout=3)
    assert relayed == [True]
    assert result.status == 400 and result.error_code == errors.TIMEOUT
    assert engine.stats()["timeouts"] == 1
    assert await eventually(lambda: engine._sweeping is None)


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
    assert engine.stats()["timeouts"] == 2
    assert await eventually(lambda: engine._sweeping is None)
    assert (await server.query({"code": "after = 1"})).results == {"after": 1}


async def test_the_writer_survives_write_now_sending_what_it_waited_to_send(server, start_connector):
    """The writer task waits for the link to be ready again (an attach) with frames queued; write_now()
    sends them in the step the link becomes ready, before the writer runs: the writer must find the
    outbox empty and wait again, not fail (it did: an IndexError ended it, and later frames stayed
    queued for good)."""
    running = await start(server, start_connector, "inline")
    link = running.session.link
    link._ready.clear()                 # as while attaching again after reconnectRequired
    link.send(json.dumps({"op": "notification", "resourceName": "sources", "resourceId": SOURCE,
                          "object": {"n": 1}}))
    await asyncio.sleep(0.05)           # the writer is now waiting for the link to be ready
    link._ready.set()
    link.write_now()                    # sends the queued frame before the writer's next step
    assert link.pending_frames == 0
    await asyncio.sleep(0.05)
    link.send(json.dumps({"op": "notification", "resourceName": "sources", "resourceId": SOURCE,
                          "object": {"n": 2}}))
    await server.wait_notifications(SOURCE, 2, timeout=5)
    assert sorted(n["n"] for n in server.notifications[SOURCE]) == [1, 2]
    assert (await server.query({"code": "after = 1"})).results == {"after": 1}

"""Faults injected through devserver.py: drops mid-stream, during the handshake and between a partial and
the final reply; reconnectRequired storms; refusals; silent handshakes; failing document endpoints; pings
left unanswered. Nothing produced meanwhile is lost, duplicated or reordered."""
import asyncio
import logging

import pytest

from pyexec_connector import errors
from pyexec_connector.config import build_server_config
from pyexec_connector.connector import Connector

from .conftest import SOURCE, TOKEN

STREAM = """
import asyncio
async def go():
    for i in range(count):
        await connector_connection.send_query_response(connector_context, 100, {'n': i})
        if i % 5 == 0:
            await connector_connection.send_notification({'n': i})
        await asyncio.sleep(pause)
    await connector_connection.send_query_response(connector_context, 200, {'n': count})
asyncio.get_event_loop().create_task(go())
"""


def stream(count: int, pause: float) -> dict:
    return {"code": STREAM, "codeHandlesReturn": True, "presetValues": {"count": count, "pause": pause}}


def assert_complete_stream(result, count: int) -> None:
    assert [r["body"]["n"] for r in result.replies] == list(range(count + 1))
    assert [r["status"] for r in result.replies] == [100] * count + [200]


async def assert_notifications(server, count: int) -> None:
    expected = [{"n": i} for i in range(0, count, 5)]
    assert await server.wait_notifications(SOURCE, len(expected)) == expected
    await asyncio.sleep(0.05)
    assert server.notifications[SOURCE] == expected        # none twice


async def wait_for(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("mode", ["process", "inline"])
@pytest.mark.parametrize("abrupt", [False, True], ids=["close-frame", "tcp-cut"])
async def test_drops_mid_stream_lose_nothing(server, start_connector, abrupt, mode):
    server.set_source_config(SOURCE, {"executionMode": mode, "workers": 1})
    running = await start_connector()
    address = await server.send_query(SOURCE, stream(120, 0.005))
    for _ in range(3):
        await asyncio.sleep(0.15)
        await server.drop(SOURCE, abrupt=abrupt)
        await server.wait_attached(SOURCE)
    result = await server.replies_for(address, timeout=30)
    if abrupt:
        # a TCP cut loses what was in flight at that instant (no protocol can tell); nothing is reordered
        numbers = [r["body"]["n"] for r in result.replies]
        assert numbers == sorted(set(numbers)) and numbers[-1] == 120
    else:
        assert_complete_stream(result, 120)
        await assert_notifications(server, 120)
    assert running.session.link.reconnects == 3
    assert (await server.query({"code": "x = 1"})).results == {"x": 1}


async def test_drop_between_a_partial_and_the_final_reply(connected):
    server, _ = connected
    code = ("import asyncio\n"
            "async def go():\n"
            "    await connector_connection.send_query_response(connector_context, 100, {'part': 1})\n"
            "    await asyncio.sleep(0.3)\n"
            "    await connector_connection.send_notification({'between': True})\n"
            "    await connector_connection.send_query_response(connector_context, 200, {'part': 2})\n"
            "asyncio.get_event_loop().create_task(go())")
    address = await server.send_query(SOURCE, {"code": code, "codeHandlesReturn": True})
    await server.wait_received(address, 1)        # the first partial reply
    server.close_during_handshake("validate", 2)     # the first two reconnects fail as well
    await server.drop(SOURCE)
    result = await server.replies_for(address, timeout=20)
    assert [(r["status"], r["body"]["part"]) for r in result.replies] == [(100, 1), (200, 2)]
    assert await server.wait_notifications(SOURCE, 1) == [{"between": True}]


@pytest.mark.parametrize("stage", ["validate", "connectExtension"])
async def test_socket_closed_during_the_handshake(connected, stage):
    server, running = connected
    address = await server.send_query(SOURCE, stream(40, 0.01))
    await asyncio.sleep(0.1)
    server.close_during_handshake(stage, 3)
    await server.drop(SOURCE)
    result = await server.replies_for(address, timeout=30)
    assert_complete_stream(result, 40)
    await assert_notifications(server, 40)
    assert running.session.link.reconnects == 4          # the drop, then three handshakes cut
    assert (await server.query({"code": "x = 1"})).results == {"x": 1}


async def test_reconnect_required_storm(connected):
    server, running = connected
    address = await server.send_query(SOURCE, stream(60, 0.005))
    for _ in range(50):
        await server.request_reconnect(SOURCE)
    result = await server.replies_for(address, timeout=30)
    assert_complete_stream(result, 60)
    await assert_notifications(server, 60)
    await server.wait_attached(SOURCE)
    await wait_for(lambda: server.connects(SOURCE) == 51)
    assert running.session.link.reconnects == 0 and server.validations == 1   # all on the same socket
    answers = await asyncio.gather(*(server.query({"code": f"x = {i}"}) for i in range(20)))
    assert [a.results["x"] for a in answers] == list(range(20))


async def test_handshake_timeout_is_named_and_retried(server, caplog):
    server.silent_validate = True
    config = build_server_config({"targetServer": server.url, "authToken": TOKEN, "sources": SOURCE}, env={})
    connector = Connector(config, backoff_initial=0.02, backoff_max=0.1, handshake_timeout=0.3)
    task = asyncio.create_task(connector.run())
    try:
        await wait_for(lambda: connector.sessions[SOURCE].link.reconnects >= 3)
        assert not connector.ready
        timeouts = [r for r in caplog.records if "did not answer validate within 0.3 s" in r.getMessage()]
        assert [r.levelname for r in timeouts][:1] == ["WARNING"]
        assert sum(r.levelname == "WARNING" for r in timeouts) == 1      # once per change, not per attempt
        server.silent_validate = False
        await connector.wait_ready(timeout=10)
        assert (await server.query({"code": "x = 1"})).results == {"x": 1}
    finally:
        connector.stop()
        await task


async def test_refusals_retry_and_warn_once_per_change(server, start_connector, caplog):
    caplog.set_level(logging.DEBUG, logger="pyexec_connector")
    server.refuse(SOURCE, 404, "io.vantiq.resource.not.found", "The source {0} does not exist.")
    running = await start_connector(wait=False)
    await wait_for(lambda: server.connects(SOURCE) >= 4)
    server.refuse(SOURCE, 409, "io.vantiq.source.already.served", "The source {0} is already served.")
    start = server.connects(SOURCE)
    await wait_for(lambda: server.connects(SOURCE) >= start + 4)
    server.accept(SOURCE)
    await running.connector.wait_ready(timeout=10)
    refusals = [r for r in caplog.records if "refused the connection" in r.getMessage()]
    warnings = [r.getMessage() for r in refusals if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert "does not exist" in warnings[0] and "already served" in warnings[1]
    assert len(refusals) >= 8                       # every attempt is still in the DEBUG log
    assert all(r.levelname == "DEBUG" for r in refusals if r.getMessage() not in warnings)
    assert (await server.query({"code": "x = 1"})).results == {"x": 1}


async def test_refusals_back_off(server, start_connector):
    server.refuse(SOURCE, 409, "io.vantiq.source.already.served", "The source {0} is already served.")
    running = await start_connector(wait=False)
    await wait_for(lambda: server.connects(SOURCE) >= 5)
    backoff = running.session.link.backoff
    assert backoff.attempt >= 4                     # growing delays (capped at 0.2 s by the fixture)
    server.accept(SOURCE)
    await running.connector.wait_ready(timeout=10)
    assert backoff.attempt == 0                     # a good connection resets it


async def test_server_that_never_upgrades_the_websocket(unused_tcp_port, caplog):
    """TCP accepted, the HTTP upgrade never answered: the opening handshake times out and is retried."""
    held = []

    async def mute(reader, writer):
        held.append(writer)

    listener = await asyncio.start_server(mute, "127.0.0.1", unused_tcp_port)
    config = build_server_config({"targetServer": f"http://127.0.0.1:{unused_tcp_port}", "authToken": TOKEN,
                                  "sources": SOURCE}, env={})
    connector = Connector(config, backoff_initial=0.02, backoff_max=0.1, handshake_timeout=0.3)
    task = asyncio.create_task(connector.run())
    try:
        await wait_for(lambda: len(held) >= 3)
        assert connector.sessions[SOURCE].link.reconnects >= 2 and not connector.ready
        assert any(r.levelname == "WARNING" and "TimeoutError" in r.getMessage() for r in caplog.records)
    finally:
        connector.stop()
        await task
        for writer in held:
            writer.close()
        listener.close()
        await listener.wait_closed()


async def test_one_source_dropped_leaves_the_other_alone(server, start_connector):
    running = await start_connector(sources=f"{SOURCE}, second")
    address = await server.send_query("second", stream(30, 0.01))
    await server.drop(SOURCE)
    result = await server.replies_for(address, timeout=20)
    assert_complete_stream(result, 30)
    assert running.connector.sessions["second"].link.reconnects == 0
    await server.wait_attached(SOURCE)
    assert running.connector.sessions[SOURCE].link.reconnects == 1


async def test_document_endpoint_errors_and_hangs(server, start_connector):
    running = await start_connector(documentTimeout=0.5)
    server.put_document("err.py", "x = 1", fault="error")
    failed = await server.query({"script": "err.py"})
    assert failed.error_code == errors.DOC_FETCH and 500 in failed.body["parameters"]
    server.put_document("hang.py", "x = 1", fault="hang")
    hung = await server.query({"script": "hang.py"})
    assert hung.error_code == errors.DOC_FETCH and "documentTimeout" in hung.body["messageTemplate"]
    server.put_document("long.py", "x = 1\n" * 10, content_size=3)
    assert (await server.query({"script": "long.py"})).error_code == errors.DOC_LENGTH
    server.put_document("good.py", "x = 1")
    assert (await server.query({"script": "good.py"})).results == {"x": 1}
    assert running.session.link.reconnects == 0


async def test_unanswered_pings_are_detected_and_the_link_reconnects(server, start_connector):
    running = await start_connector(sendPings="true",
                                    connectKWArgs='{"ping_interval": 0.1, "ping_timeout": 0.3}')
    await wait_for(lambda: server.pings >= 3)            # explicit values with sendPings=true: pings flow
    assert running.session.link.reconnects == 0
    server.answer_pings = False
    await wait_for(lambda: running.session.link.reconnects >= 1, timeout=15)
    server.answer_pings = True
    await running.connector.wait_ready(timeout=10)
    assert (await server.query({"code": "x = 1"})).results == {"x": 1}


async def test_no_pings_without_send_pings(connected):
    server, _ = connected
    await asyncio.sleep(0.3)
    assert server.pings == 0

"""The link: handshake, reconnects, ordering across a drop, garbage frames."""
import asyncio
import json

import pytest

from pyexec_connector.config import build_server_config
from pyexec_connector.connector import Connector
from pyexec_connector.errors import AuthenticationError
from pyexec_connector.link import Backoff, ConnectionFailed, LinkState

from .conftest import SOURCE, TOKEN


def test_backoff_is_capped_exponential_with_jitter():
    low = Backoff(1.0, 8.0, rng=lambda: 0.0)
    assert [low.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    high = Backoff(1.0, 8.0, rng=lambda: 0.999999)
    assert [round(high.next(), 3) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    high.reset()
    assert round(high.next(), 3) == 1.0
    spread = {Backoff(1.0, 8.0).next() for _ in range(50)}
    assert len(spread) > 40 and all(0.5 <= d <= 1.0 for d in spread)


async def test_handshake_frames(connected):
    server, running = connected
    assert server.validations == 1 and server.connects(SOURCE) == 1
    assert running.session.link.state is LinkState.READY


async def test_reconnect_after_the_server_drops_the_socket(connected):
    server, running = connected
    await server.drop(SOURCE)
    await server.wait_attached(SOURCE)
    assert server.connects(SOURCE) == 2 and server.validations == 2
    assert (await server.query({"code": "x = 1"})).results == {"x": 1}
    assert running.session.link.reconnects == 1


async def test_reconnect_required_on_the_same_socket(connected):
    server, running = connected
    await server.request_reconnect(SOURCE)
    await server.wait_attached(SOURCE)
    assert server.connects(SOURCE) == 2
    assert server.validations == 1        # same socket: no new validate
    assert running.session.link.reconnects == 0
    assert (await server.query({"code": "x = 2"})).results == {"x": 2}


async def test_reply_made_while_disconnected_arrives_after_reconnect(connected):
    server, _ = connected
    code = ("import asyncio\n"
            "async def go():\n"
            "    await connector_connection.send_query_response(connector_context, 100, {'n': 0})\n"
            "    await asyncio.sleep(0.4)\n"
            "    await connector_connection.send_query_response(connector_context, 100, {'n': 1})\n"
            "    await connector_connection.send_notification({'during': 'outage'})\n"
            "    await connector_connection.send_query_response(connector_context, 200, {'n': 2})\n"
            "asyncio.get_event_loop().create_task(go())")
    address = await server.send_query(SOURCE, {"code": code, "codeHandlesReturn": True})
    await asyncio.sleep(0.15)
    server.refuse(SOURCE, 503, "io.vantiq.unavailable", "try later")   # keep it down a while
    await server.drop(SOURCE)
    await asyncio.sleep(0.5)            # the code replied while the link was down
    server.accept(SOURCE)
    result = await server.replies_for(address, timeout=10)
    assert [r["body"]["n"] for r in result.replies] == [0, 1, 2]
    assert (await server.wait_notifications(SOURCE, 1)) == [{"during": "outage"}]


@pytest.mark.parametrize("garbage", [
    "{not json", "[1, 2, 3]", "null", "17", '"str"', '{"op": "mystery"}',
    '{"op": "query", "object": {"code": "x=1"}}', b'{"op": "unknownBinary"}', b"\xff\xfe\x00",
    '{"op": "publish", "object": {"a": 1}}', '{"status": 500, "body": [{"code": "c", "message": "m"}]}',
])
async def test_garbage_frames_are_skipped(connected, garbage):
    server, running = connected
    await server.send_raw(SOURCE, garbage)
    result = await server.query({"code": "alive = True"})
    assert result.results == {"alive": True}
    assert server.connects(SOURCE) == 1 and running.session.link.reconnects == 0


async def test_binary_query_frames_are_answered(connected):
    server, _ = connected
    address = "bin-1"
    server.expect(address)
    await server.send_raw(SOURCE, json.dumps({"op": "query", "object": {"code": "b = 1"},
                                              "messageHeaders": {"REPLY_ADDR_HEADER": address}}).encode())
    assert (await server.replies_for(address)).results == {"b": 1}


async def test_bad_token_is_fatal(server):
    config = build_server_config({"targetServer": server.url, "authToken": "wrong", "sources": SOURCE}, env={})
    connector = Connector(config, backoff_initial=0.01, backoff_max=0.05)
    with pytest.raises(AuthenticationError) as info:
        await asyncio.wait_for(connector.run(), 10)
    assert "refused the access token" in str(info.value) and "wrong" not in str(info.value)
    assert server.validations == 1


async def test_fail_on_connection_error(unused_tcp_port):
    config = build_server_config({"targetServer": f"http://127.0.0.1:{unused_tcp_port}", "authToken": TOKEN,
                                  "sources": SOURCE, "failOnConnectionError": "true"}, env={})
    with pytest.raises(ConnectionFailed):
        await asyncio.wait_for(Connector(config).run(), 10)


async def test_retries_until_the_server_appears(unused_tcp_port, start_connector):
    from pyexec_connector.devserver import DevServer
    config = build_server_config({"targetServer": f"http://127.0.0.1:{unused_tcp_port}", "authToken": TOKEN,
                                  "sources": SOURCE}, env={})
    connector = Connector(config, backoff_initial=0.02, backoff_max=0.1)
    task = asyncio.create_task(connector.run())
    await asyncio.sleep(0.3)
    assert not connector.ready
    late = DevServer(token=TOKEN, sources=(SOURCE,))
    await late.start(port=unused_tcp_port)
    try:
        await connector.wait_ready(timeout=10)
        assert (await late.query({"code": "x = 1"})).results == {"x": 1}
    finally:
        connector.stop()
        await task
        await late.stop()


async def test_refused_source_retries_and_logs_once(server, start_connector, caplog):
    server.refuse(SOURCE, 404, "io.vantiq.resource.not.found", "The source does not exist.")
    running = await start_connector(wait=False)
    for _ in range(200):
        if server.connects(SOURCE) >= 4:
            break
        await asyncio.sleep(0.02)
    assert server.connects(SOURCE) >= 4
    warnings = [r for r in caplog.records if "refused the connection" in r.getMessage()
                and r.levelname == "WARNING"]
    assert len(warnings) == 1
    server.accept(SOURCE)
    await running.connector.wait_ready(timeout=10)
    assert (await server.query({"code": "x = 1"})).results == {"x": 1}


async def test_handshake_timeout_when_validate_is_never_answered(server, start_connector):
    server.silent_validate = True
    running = await start_connector(wait=False)
    await asyncio.sleep(2.5)             # handshake_timeout is 2 s in the fixture
    assert not running.connector.ready
    server.silent_validate = False
    await running.connector.wait_ready(timeout=10)


async def test_several_sources(server, start_connector):
    running = await start_connector(sources=f"{SOURCE}, second")
    assert set(running.connector.sessions) == {SOURCE, "second"}
    assert (await server.query({"code": "x = 1"}, source="second")).results == {"x": 1}
    assert (await server.query({"code": "x = 2"}, source=SOURCE)).results == {"x": 2}

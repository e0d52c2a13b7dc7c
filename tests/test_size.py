"""Sizes: multi-megabyte payloads work; over maxMessageBytes a query gets a 400, not a dead link."""
import asyncio
import json

import pytest

from pyexec_connector import errors

from .conftest import SOURCE

MiB = 1024 * 1024


async def test_multi_megabyte_presets_and_results(connected):
    server, running = connected
    blob = "v" * (3 * MiB)
    result = await server.query({"code": "n = len(blob)\nechoed = blob + '!'", "presetValues": {"blob": blob}},
                                timeout=30)
    assert result.status == 200
    assert result.results["n"] == 3 * MiB and result.results["echoed"] == blob + "!"
    assert running.session.link.reconnects == 0


async def test_query_over_the_limit_gets_a_400_naming_it(server, start_connector):
    running = await start_connector(maxMessageBytes=MiB)
    big = {"code": "x = 1", "presetValues": {"blob": "b" * (2 * MiB)}}
    result = await server.query(big, timeout=30)
    assert result.status == 400 and result.error_code == errors.TOO_LARGE
    size, limit = result.body["parameters"]
    assert limit == MiB and size > 2 * MiB
    assert "maxMessageBytes" in result.body["messageTemplate"]
    # the link lived: no reconnect, and the next query is answered
    assert (await server.query({"code": "after = 1"})).results == {"after": 1}
    assert running.session.link.reconnects == 0 and server.connects(SOURCE) == 1


async def test_frame_over_the_websocket_ceiling_costs_a_reconnect_not_the_connector(server, start_connector):
    """Past 4 x maxMessageBytes websockets itself closes the connection (1009) to bound memory."""
    running = await start_connector(maxMessageBytes=MiB)
    address = await server.send_query(SOURCE, {"code": "x = 1", "presetValues": {"blob": "b" * (5 * MiB)}})
    await server.wait_attached(SOURCE)
    for _ in range(500):
        if running.session.link.reconnects:
            break
        await asyncio.sleep(0.02)
    assert running.session.link.reconnects == 1
    await running.connector.wait_ready(timeout=10)
    assert (await server.query({"code": "after = 1"})).results == {"after": 1}
    server.forget(address)


async def test_results_over_the_limit_get_a_400(server, start_connector):
    await start_connector(maxMessageBytes=MiB)
    result = await server.query({"code": "big = 'r' * 2_000_000\nsmall = 1"})
    assert result.status == 400 and result.error_code == errors.TOO_LARGE
    assert "limitReturnTo" in result.body["messageTemplate"]
    limited = await server.query({"code": "big = 'r' * 2_000_000\nsmall = 1", "limitReturnTo": ["small"]})
    assert limited.results == {"small": 1}


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_streamed_reply_or_notification_over_the_limit_fails_the_query(server, start_connector, mode):
    server.set_source_config(SOURCE, {"executionMode": mode, "workers": 1})
    running = await start_connector(maxMessageBytes=MiB)
    for call in ("await connector_connection.send_query_response(connector_context, 100, {'b': 'x' * 2_000_000})",
                 "await connector_connection.send_notification({'b': 'x' * 2_000_000})"):
        code = f"import asyncio\nasync def go():\n    {call}\nasyncio.get_event_loop().create_task(go())"
        result = await server.query({"code": code, "codeHandlesReturn": True})
        assert result.status == 400 and result.error_code == errors.EXECUTION_EXCEPTION
        assert "over maxMessageBytes" in result.body["parameters"][1]
    assert running.session.link.reconnects == 0 and server.notifications[SOURCE] == []


async def test_unicode_results_are_measured_in_bytes(server, start_connector):
    await start_connector(maxMessageBytes=MiB)
    # 300 000 characters of 4 bytes each: 1.2 MB on the wire although under a million characters
    result = await server.query({"code": "s = '\U0001F600' * 300_000"})
    assert result.error_code == errors.TOO_LARGE
    ok = await server.query({"code": "s = '\U0001F600' * 200_000"})
    assert ok.status == 200 and len(ok.results["s"]) == 200_000


async def test_multi_megabyte_script_document(connected):
    server, _ = connected
    text = "data = " + json.dumps(["row"] * 600_000) + "\nn = len(data)\ndel data\n"
    assert len(text) > 4 * MiB
    server.put_document("big.py", text)
    result = await server.query({"script": "big.py"}, timeout=60)
    assert result.status == 200, result.body
    assert result.results == {"n": 600_000}


async def test_document_over_max_document_bytes(server, start_connector):
    await start_connector(maxDocumentBytes=4096)
    server.put_document("small.py", "ok = True")
    assert (await server.query({"script": "small.py"})).results == {"ok": True}
    server.put_document("large.py", "x = 1\n" * 2000)
    result = await server.query({"script": "large.py"})
    assert result.error_code == errors.DOC_LENGTH
    assert "maxDocumentBytes" in result.body["messageTemplate"]


async def test_document_longer_than_its_content_size(connected):
    server, running = connected
    server.put_document("long.py", "x = 1\n" + "#" * 100_000, content_size=6)
    result = await server.query({"script": "long.py"})
    assert result.error_code == errors.DOC_LENGTH
    assert result.body["parameters"][:2] == ["long.py", 6]
    assert result.body["parameters"][2] == 7      # read no further than one byte past what was promised


async def test_refused_frames_are_counted_like_any_other_answered_query(server, start_connector):
    running = await start_connector(maxMessageBytes=MiB)
    await server.query({"code": "x = 1", "presetValues": {"blob": "b" * (2 * MiB)}}, timeout=30)
    address = "cut-1"
    server.expect(address)
    await server.send_raw(SOURCE, '{"op": "query", "messageHeaders": {"REPLY_ADDR_HEADER": "cut-1"}, "object": {')
    assert (await server.replies_for(address)).error_code == errors.BAD_QUERY
    registry = running.connector.metrics.registry
    for code in (errors.TOO_LARGE, errors.BAD_QUERY):
        assert registry.get_sample_value("pyexec_query_errors_total", {"source": SOURCE, "message_code": code}) == 1
    assert running.session.queries_answered == 2

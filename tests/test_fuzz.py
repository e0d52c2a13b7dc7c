"""Frame fuzzing through the real link: whatever the server sends, the session survives without a
reconnect and the next valid query is answered. A cut-off query that still names its reply address is
answered with a 400."""
import asyncio
import json
import random

import pytest

from pyexec_connector import errors

from .conftest import SOURCE

VALID = {"op": "query", "resourceName": "sources", "resourceId": SOURCE,
         "messageHeaders": {"REPLY_ADDR_HEADER": "?"}, "object": {"code": "x = 1", "presetValues": {"a": [1]}}}

GARBAGE = [
    "", " ", "{", "}", "{not json", '{"op": "query"', "[]", "[1, 2, 3]", "null", "17", "-1.5e308", '"text"', "true",
    "{}", "NaN", "Infinity", '{"op": null}', '{"op": 5}', '{"op": ["query"]}', '{"op": {"a": 1}}', '{"op": "mystery"}',
    '{"op": "' + "o" * 100_000 + '"}', '{"op": "query"}', '{"op": "query", "object": {"code": "x=1"}}',
    '{"op": "query", "messageHeaders": null, "object": {}}', '{"op": "query", "messageHeaders": []}',
    '{"op": "query", "messageHeaders": {"REPLY_ADDR_HEADER": 5}}', '{"op": "query", "messageHeaders": '
    '{"REPLY_ADDR_HEADER": ""}}', '{"op": "query", "messageHeaders": {"REPLY_ADDR_HEADER": ["a"]}}',
    '{"op": "publish"}', '{"op": "publish", "object": [1]}', '{"status": "x"}', '{"status": true}',
    '{"status": 500}', '{"status": 404, "body": "not a list"}', '{"status": 99999999999999999999999999}',
    '{"status": 301, "body": [{"code": null, "message": {"nested": 1}}]}', '{"op": "configureExtension"}',
    '{"op": "configureExtension", "object": 5}', '{"op": "configureExtension", "object": {"config": [1]}}',
    '{"op": "configureExtension", "object": {"config": {"pythonExecConfig": {"general": {"codeCacheSize": "x"}}}}}',
    '{"op": "configureExtension", "object": {"config": {"pythonExecConfig": 7}}}',
    "[" * 100_000, '{"a":' * 50_000, "1" * 5000, '{"n": ' + "9" * 5000 + "}", '"\\ud800"',
    b"", b"\x00", b"\xff\xfe\x00", b"\xef\xbb\xbf{}", "\ufeff{}".encode("utf-16"), b'{"op": "unknownBinary"}',
    bytes(range(256)), json.dumps({"op": "query", "object": {"code": "x=1"},
                                   "messageHeaders": {"REPLY_ADDR_HEADER": "\ud800"}}),
]


async def alive(server, running, n: int) -> None:
    result = await server.query({"code": f"alive = {n}"})
    assert result.results == {"alive": n}
    assert running.session.link.reconnects == 0 and server.connects(SOURCE) == 1


async def test_garbage_frames_leave_the_session_alive(connected):
    server, running = connected
    for n, frame in enumerate(GARBAGE):
        await server.send_raw(SOURCE, frame)
        await alive(server, running, n)
    await asyncio.sleep(0.1)
    # the surrogate address got its reply, escaped, and nothing else went astray
    assert [r["headers"]["X-Reply-Address"] for r in server.stray_replies] == ["\ud800"]


async def test_cut_off_queries_are_answered_when_they_name_their_address(connected):
    server, running = connected
    answered = 0
    for n, cut in enumerate(range(1, len(json.dumps(VALID)), 3)):
        address = f"cut-{n}"
        text = json.dumps({**VALID, "messageHeaders": {"REPLY_ADDR_HEADER": address}})[:cut]
        has_address = f'"{address}"' in text
        server.expect(address)
        await server.send_raw(SOURCE, text.encode() if n % 2 else text)
        if has_address and not text.endswith("}}"):
            result = await server.replies_for(address, timeout=10)
            assert result.status == 400 and result.error_code == errors.BAD_QUERY
            assert "could not be read" in result.body["messageTemplate"]
            answered += 1
        else:
            server.forget(address)
        await alive(server, running, n)
    assert answered > 10


async def test_random_bytes_and_mutated_frames(connected):
    server, running = connected
    rng = random.Random(20261122)
    for n in range(400):
        template = json.dumps({**VALID, "messageHeaders": {"REPLY_ADDR_HEADER": f"mut-{n}"}}).encode()
        if n % 2:
            frame = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        else:
            mutated = bytearray(template)
            for _ in range(rng.randrange(1, 6)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            frame = bytes(mutated)
        await server.send_raw(SOURCE, frame if n % 3 else frame.decode("utf-8", "replace"))
        if n % 50 == 0:
            await alive(server, running, n)
    await alive(server, running, -1)
    # a mutated frame may still be a query for some address: it gets one terminal reply, never two
    addresses = [r["headers"]["X-Reply-Address"] for r in server.stray_replies if r["status"] != 100]
    assert len(addresses) == len(set(addresses))


@pytest.mark.parametrize("params, code", [
    ({"script": "\ud800"}, errors.DOC_FETCH),                  # no URL can name it: was an internal error
    ({"script": ""}, errors.BAD_PARAMETER),                     # was a fetch of the document list URL
    ({"script": "a\x00b"}, errors.BAD_PARAMETER),
    ({"name": ""}, errors.BAD_PARAMETER),
    ({"code": "x = 1", "name": "\x00"}, errors.BAD_PARAMETER),  # was reported as a compile error
    ({"code": "\ud800"}, errors.SYNTAX_ERROR),
    ({"code": "\x00"}, errors.SYNTAX_ERROR),
    ({"code": "x = 1", "presetValues": {"\ud800": "\udfff"}}, None),
    ({"code": "x = 1", "name": "\ud800", "limitReturnTo": ["\ud800", "x"]}, None),
])
async def test_odd_text_in_with_parameters(connected, params, code):
    server, running = connected
    result = await server.query(params)
    assert result.error_code == code, result.body
    if code is None:
        assert result.status == 200 and result.results["x"] == 1
    assert running.session.link.reconnects == 0

import json

import pytest

from pyexec_connector import protocol
from pyexec_connector.errors import QueryError


def test_query_frame():
    frame = protocol.parse_frame(json.dumps({"op": "query", "object": {"code": "x=1"},
                                             "messageHeaders": {"REPLY_ADDR_HEADER": "addr-1"}}))
    assert frame == protocol.QueryFrame("addr-1", {"code": "x=1"})


def test_binary_frames_accepted():
    raw = json.dumps({"op": "configureExtension", "object": {"config": {"a": 1}}}).encode()
    assert protocol.parse_frame(raw) == protocol.ConfigureFrame({"a": 1})


@pytest.mark.parametrize("raw", [
    "{not json", "[1, 2]", "null", "42", '"text"', b"\xff\xfe", '{"op": "mystery"}',
    '{"op": "query", "object": {}}', '{"op": "query", "messageHeaders": {"REPLY_ADDR_HEADER": 5}}',
    '{"status": "bad"}', "",
])
def test_bad_frames_never_raise(raw):
    assert isinstance(protocol.parse_frame(raw), protocol.BadFrame)


def test_other_frames():
    assert protocol.parse_frame('{"op": "reconnectRequired"}') == protocol.ReconnectRequiredFrame()
    assert protocol.parse_frame('{"op": "publish", "object": {"a": 1}}') == protocol.PublishFrame({"a": 1})
    assert protocol.parse_frame('{"status": 404, "body": []}') == protocol.StatusFrame(404, [])


def test_outgoing_frames():
    assert json.loads(protocol.validate_frame("t")) == {"op": "validate", "resourceName": "system.credentials",
                                                        "object": "t"}
    assert json.loads(protocol.connect_frame("s", "s_x")) == {
        "op": "connectExtension", "resourceName": "sources", "resourceId": "s",
        "parameters": {"reconnectSecret": "s_x"}}
    assert json.loads(protocol.reply_frame("a", 204, {"ignored": 1})) == {"status": 204,
                                                                         "headers": {"X-Reply-Address": "a"}}
    assert json.loads(protocol.reply_frame_raw("a", 200, '{"x":1}')) == {
        "status": 200, "headers": {"X-Reply-Address": "a"}, "body": {"x": 1}}
    assert json.loads(protocol.error_frame("a", QueryError("c", "t {0}", [1]))) == {
        "status": 400, "headers": {"X-Reply-Address": "a"},
        "body": {"messageCode": "c", "messageTemplate": "t {0}", "parameters": [1]}}
    assert json.loads(protocol.notification_frame("s", {"n": 1})) == {
        "op": "notification", "resourceName": "sources", "resourceId": "s", "object": {"n": 1}}


def test_status_messages():
    assert protocol.status_messages([{"code": "c", "message": "m"}]) == "c: m"
    assert protocol.status_messages(None) == "(no message)"


def test_dumps_is_compact_json_and_takes_what_orjson_rejects():
    import math
    value = {"a": [1, 2.5, "é\u2028", None, True], "b": {"c": 1e300, "d": -0.0}, "e": "q\"\\"}
    assert json.loads(protocol.dumps(value)) == value and " " not in protocol.dumps(value)
    assert protocol.dumps({"x": math.nan, "y": [-math.inf]}) == '{"x":null,"y":[null]}'
    with pytest.raises(TypeError, match="object"):
        protocol.dumps({"x": object()})
    assert protocol.dumps({"x": 1}) == '{"x":1}'
    # beyond orjson: integers over 64 bits, lone surrogates, nesting deeper than 254, non-str keys
    deep: list = []
    for _ in range(400):
        deep = [deep]
    for odd in (2 ** 70, -(2 ** 100), "a\ud800b", deep, {1: "a", None: 2, 2.5: 3}):
        assert protocol.dumps(odd) == json.dumps(odd, ensure_ascii=False, separators=(",", ":"))
    loop: list = []
    loop.append(loop)
    with pytest.raises(TypeError):
        protocol.dumps({"loop": loop})


# ---- reading a frame: always what the standard library reads ------------------------------------

def _same_reading(raw: bytes) -> None:
    """protocol.loads gives what json.loads gives, types and all (an int stays an int), or the same error."""
    try:
        expected = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        with pytest.raises(type(exc)) as raised:
            protocol.loads(raw)
        assert str(raised.value) == str(exc)
        return
    got = protocol.loads(raw)
    assert repr(got) == repr(expected)
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)


@pytest.mark.parametrize("value", [
    "NaN", "Infinity", "-Infinity", "[NaN, 1]", "1e400", "-1e400", "1.7976931348623157e309",
    "18446744073709551615", "18446744073709551616", "9223372036854775807", "-9223372036854775808",
    "-9223372036854775809", "123456789012345678901234567890", "-123456789012345678901234567890",
    '"\\ud800"', '"a\\udfffb"', '"\\ud83d\\ude42"', '"\\u0000"', "-0", "-0.0", "5e-324", "1E2", "0.1",
    "2.2250738585072011e-308", "1.00000000000000000000001", '{"a": 1, "b": 2, "a": 3}', "[]", "{}",
])
def test_frames_read_as_the_standard_library_reads_them(value):
    frame = '{"op": "query", "object": {"presetValues": {"v": %s}}, ' \
            '"messageHeaders": {"REPLY_ADDR_HEADER": "a"}}' % value
    _same_reading(frame.encode())
    parsed, from_text = protocol.parse_frame(frame.encode()), protocol.parse_frame(frame)
    assert type(parsed) is protocol.QueryFrame and parsed.raw == frame.encode()
    assert repr(parsed.params) == repr(from_text.params)      # bytes read as text (the standard library) is


@pytest.mark.parametrize("raw", [
    b"\xef\xbb\xbf{\"a\": 1}", '{"a": 1}'.encode("utf-16"), '{"a": 1}'.encode("utf-32-le"), b'{"a": "\xff"}',
    b'{"a": "\x01"}', b'{"a": 1} x', b"", b"[" * 600 + b"]" * 600, b"[" * 1000 + b"]" * 1000, b"[" * 5000 + b"]" * 5000,
    b'{"a": [' + b"[" * 300 + b"]" * 300 + b"]}",
])
def test_unusual_bytes_read_as_the_standard_library_reads_them(raw):
    _same_reading(raw)


def test_nesting_follows_the_recursion_limit_of_now():
    """The standard library's nesting limit moves with sys.setrecursionlimit (inline code may call it)."""
    import sys
    raw = b"[" * 150 + b"]" * 150
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(120)
    try:
        with pytest.raises(RecursionError):
            protocol.loads(raw)
        assert protocol.parse_frame(b'{"a": %s}' % raw) == protocol.BadFrame("nested too deeply")
    finally:
        sys.setrecursionlimit(limit)
    assert protocol.loads(raw) == json.loads(raw)

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

"""Property-based tests (hypothesis): any JSON value as a query object, and any combination of WITH
parameters with values of any JSON type, gets exactly one terminal reply (200, or a 400 naming the
problem) and never lets an exception escape: through request.parse_query directly (thousands of examples)
and through the real link to devserver.py (a few hundred)."""
from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyexec_connector import errors, protocol
from pyexec_connector.config import build_server_config
from pyexec_connector.connector import Connector
from pyexec_connector.devserver import DevServer
from pyexec_connector.errors import QueryError
from pyexec_connector.request import KNOWN_PARAMETERS, QueryRequest, parse_query

from .conftest import SOURCE, TOKEN

EXAMPLES = Counter()     # examples tried per property, for the report (pytest -s shows them)
SCALE = int(os.environ.get("PROPERTY_SCALE", "1"))     # PROPERTY_SCALE=10 for a longer search

# Any JSON text can carry a lone surrogate ("\ud800"), so strings include some.
json_text = st.text(max_size=8) | st.sampled_from(["\ud800", "a\udfffb", "\x00", "é🙂"])
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                | json_text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(json_text, inner, max_size=3), max_leaves=8)

SNIPPETS = [
    "x = 1", "total = sum(values) if isinstance(values, list) else 0", "import asyncio\nawait asyncio.sleep(0)",
    "raise ValueError('boom')", "1/0", "def broken(:", "x = chr(0xD800)", "import math\nr = math.pi",
    "from pyexec_connector import QueryError\nraise QueryError('my.code', 'bad {0}', [1])",
    "import asyncio\nasync def go():\n    await connector_connection.send_query_response(connector_context, 100, "
    "{'a': 1})\n    await connector_connection.send_query_response(connector_context, 200, {'b': 2})\n"
    "asyncio.get_event_loop().create_task(go())",
    "import asyncio\nasync def go():\n    await connector_connection.send_query_response(connector_context, 204)\n"
    "asyncio.get_event_loop().create_task(go())",
    "import asyncio\nasync def go():\n    raise KeyError('in task')\nasyncio.get_event_loop().create_task(go())",
    "await connector_connection.send_notification({'from': 'property'})",
    "__name__ = 5\nconnector_context = None",
]
BOOL_WORDS = st.sampled_from([True, False, "true", "TRUE", "yes", "t", "1", "false", "no", "0", "", "maybe", 0, 1,
                              2, -1, 0.0, 1.5, None, [], {}])
NAMES = st.sampled_from(["doc.py", "snippet", "missing.py", "", "a/b/c.py"]) | json_text
RESERVED_OR_ODD = st.sampled_from(["__builtins__", "connector_connection", "connector_context", "__name__",
                                   "__file__", "", "values", "x"]) | json_text
presets = st.dictionaries(RESERVED_OR_ODD, json_values, max_size=4)

SPECIFIC_VALUES = {
    "code": st.sampled_from(SNIPPETS) | json_values,
    "name": NAMES | json_values,
    "script": NAMES | json_values,
    "presetValues": presets | json_values,
    "codeHandlesReturn": BOOL_WORDS | json_values,
    "limitReturnTo": st.lists(RESERVED_OR_ODD, max_size=3) | st.sampled_from(["x, total", "x", ",,", ""])
    | json_values,
    "cache_code": BOOL_WORDS | json_values,
    "replace": BOOL_WORDS | json_values,
}
# every parameter the parser knows, including ones added later (they get any JSON value)
PARAMETER_VALUES = {key: SPECIFIC_VALUES.get(key, json_values) for key in sorted(KNOWN_PARAMETERS)}
# parameters other branches add (timeout, captureOutput, dryRun...), misspellings, and anything else
UNKNOWN_KEYS = (st.sampled_from(["timeout", "captureOutput", "dryRun", "Code", "CODE", "preset_values", "op",
                                 "messageHeaders", "__proto__"]) | json_text).filter(
    lambda k: k not in KNOWN_PARAMETERS)
with_clauses = st.builds(lambda known, unknown: {**unknown, **known},
                         st.fixed_dictionaries({}, optional=PARAMETER_VALUES),
                         st.dictionaries(UNKNOWN_KEYS, json_values, max_size=3))
query_objects = with_clauses | json_values
# mostly well-formed queries, so that the link property runs code too, not only the parser's refusals
plausible = st.builds(
    lambda code, extra: {"code": code, **extra},
    st.sampled_from(SNIPPETS),
    st.fixed_dictionaries({}, optional={
        "presetValues": presets, "name": st.sampled_from(["snippet", "other"]),
        "codeHandlesReturn": st.sampled_from([True, False, "true", "no"]),
        "limitReturnTo": st.sampled_from([["x"], "x, total", ["r", "nested"]]),
        "cache_code": st.booleans(), "replace": st.booleans(),
        "timeout": json_values, "captureOutput": json_values, "dryRun": json_values}))

ALL_CODES = {v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str)}


def check_error(error: QueryError, params) -> None:
    """A 400 that can go on the wire and names the problem."""
    body = json.loads(protocol.error_frame("addr", error))["body"]
    assert body["messageCode"] in ALL_CODES
    assert isinstance(body["messageTemplate"], str) and body["messageTemplate"]
    assert isinstance(body["parameters"], list)
    if error.code == errors.BAD_PARAMETER:
        assert body["parameters"][0] in KNOWN_PARAMETERS and body["parameters"][0] in params
    if error.code == errors.BAD_QUERY:
        assert not isinstance(params, dict)


def check_parse(params) -> None:
    try:
        request = parse_query(params)
    except QueryError as error:
        check_error(error, params)
        event(f"400 {error.code}")
        return
    event("accepted")
    assert isinstance(params, dict) and isinstance(request, QueryRequest)
    assert request.code is not None or request.script is not None or request.name is not None
    assert isinstance(request.preset_values, dict)
    assert isinstance(request.code_handles_return, bool) and isinstance(request.replace, bool)
    assert request.limit_return_to is None or not request.code_handles_return


@settings(max_examples=1000 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(query_objects)
def test_parse_query_any_json_value(params):
    EXAMPLES["parse_query: any JSON value"] += 1
    check_parse(params)


@settings(max_examples=1500 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(with_clauses)
def test_parse_query_any_with_clause(params):
    EXAMPLES["parse_query: WITH combinations"] += 1
    check_parse(params)


# ---- through the real link: one devserver and one connector for the whole property ----------------------

class Live:
    """devserver.py and a Connector on their own event loop in a thread, so that hypothesis (synchronous)
    can drive them example after example without restarting either."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self._start())

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.server = DevServer(token=TOKEN, sources=(SOURCE,))
        self.server.set_source_config(SOURCE, {"executionMode": self.mode})
        await self.server.start()
        self.server.put_document("doc.py", "from_doc = True")
        self.server.put_document("a/b/c.py", "import asyncio\nawait asyncio.sleep(0)\nnested = 1")
        config = build_server_config({"targetServer": self.server.url, "authToken": TOKEN, "sources": SOURCE},
                                     env={})
        self.connector = Connector(config, backoff_initial=0.02, backoff_max=0.2, handshake_timeout=2.0)
        self.task = asyncio.create_task(self.connector.run())
        await self.connector.wait_ready(timeout=10)

    async def _stop(self) -> None:
        self.connector.stop()
        await asyncio.wait_for(self.task, 10)
        await self.server.stop()

    def close(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module", params=["process", "inline"])
def live(request):
    running = Live(request.param)
    yield running
    running.close()


@settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(params=plausible | query_objects)
def test_any_query_through_the_link_gets_one_terminal_reply(live, params):
    EXAMPLES[f"through the link ({live.mode} engine)"] += 1
    result = live.call(live.server.query(params, timeout=20))
    assert [r["status"] for r in result.replies[:-1]] == [100] * (len(result.replies) - 1)
    assert result.status in (200, 204, 400), result.replies
    event(f"reply {result.status} {result.error_code or ''}".strip())
    assert result.error_code != errors.INTERNAL_ERROR, result.body     # a connector bug, not a refusal
    if result.status == 400:
        body = result.body
        assert body["messageCode"] and isinstance(body["messageTemplate"], str)
        assert isinstance(body["parameters"], list)
        if not isinstance(params, dict):
            assert body["messageCode"] == errors.BAD_QUERY
    elif not (isinstance(result.body, dict) and "pythonCallResults" in result.body):
        # 204, or a 200 without pythonCallResults: only code that sends its own replies does that
        assert isinstance(params, dict) and parse_query(params).code_handles_return
    session = live.connector.sessions[SOURCE]
    assert live.server.stray_replies == [], "a second terminal reply, or a reply nobody asked for"
    assert session.link.reconnects == 0 and live.server.connects(SOURCE) == 1
    assert live.server.bad_frames == 0


def test_report_examples(capsys):
    with capsys.disabled():
        print("\nhypothesis examples tried:", dict(EXAMPLES))


@settings(max_examples=400 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values | st.integers(min_value=-(2 ** 80), max_value=2 ** 80)
       | st.floats(allow_nan=True, allow_infinity=True))
def test_a_frame_reads_as_the_standard_library_reads_it(value):
    """protocol.loads (orjson when it can only agree) gives exactly what json.loads gives, types and all."""
    EXAMPLES["frame reading"] += 1
    raw = json.dumps({"op": "query", "object": value, "messageHeaders": {"REPLY_ADDR_HEADER": "a"}},
                     ensure_ascii=False).encode("utf-8", "surrogatepass")
    try:
        expected = json.loads(raw)
    except ValueError as exc:
        with pytest.raises(ValueError, match=None) as raised:
            protocol.loads(raw)
        assert str(raised.value) == str(exc)
        return
    assert repr(protocol.loads(raw)) == repr(expected)

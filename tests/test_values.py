"""Data comes back as data: numpy, pandas, datetimes and friends in results (limitReturnTo, resultValues
"rich"), streamed replies, notifications and error parameters, in both engines, through the real
console command and devserver; the default keeps upstream's rule."""
from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from importlib import metadata

import pytest

from pyexec_connector import errors
from pyexec_connector.config import parse_source_config

from .conftest import SOURCE

pytest.importorskip("numpy")
pytest.importorskip("pandas")

# Every kind of value the rich encoder takes, defined by user code, and how each must arrive.
SETUP = """
import dataclasses, datetime, decimal, enum, math, uuid
import numpy as np, pandas as pd, pydantic

class Colour(enum.Enum):
    RED = "red"

@dataclasses.dataclass
class Point:
    x: int
    y: float

class Model(pydantic.BaseModel):
    name: str
    when: datetime.datetime

arr = np.arange(3)
grid = np.array([[1.5, np.nan], [np.inf, 2.0]])
n = np.int64(7)
x = np.float64(1.5)
flag = np.bool_(True)
stamps = np.array(["2026-01-01T10:00", "NaT"], dtype="datetime64[ns]")
df = pd.DataFrame({"a": [1, 2], "b": ["p", "q"], "t": pd.to_datetime(["2026-01-01 10:00", None])})
indexed = pd.DataFrame({"v": [1.5]}, index=pd.Index(["k1"], name="key"))
ser = pd.Series([1.0, None])
labelled = pd.Series([1, 2], index=["a", "b"])
ts = pd.Timestamp("2026-01-01T10:00:00", tz="UTC")
nat = pd.NaT
when = datetime.datetime(2026, 1, 1)
aware = datetime.datetime(2026, 1, 1, 12, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
day = datetime.date(2026, 1, 2)
clock = datetime.time(10, 30, 15)
dec = decimal.Decimal("1.10")
u = uuid.UUID(int=5)
s = {1, 2}
fs = frozenset({"only"})
tup = (1, "two")
raw = b"\\x00\\xffhi"
colour = Colour.RED
point = Point(1, 2.5)
model = Model(name="m", when=datetime.datetime(2026, 1, 1))
nan = math.nan
inf = -math.inf
big = 2 ** 70
surrogate = chr(0xD800)
deep = []
for _ in range(300):
    deep = [deep]
del _
"""
DEEP: list = []
for _ in range(300):
    DEEP = [DEEP]
EXPECTED = {
    "arr": [0, 1, 2],
    "grid": [[1.5, None], [None, 2.0]],
    "n": 7,
    "x": 1.5,
    "flag": True,
    "stamps": ["2026-01-01T10:00:00", None],
    "df": [{"a": 1, "b": "p", "t": "2026-01-01T10:00:00"}, {"a": 2, "b": "q", "t": None}],
    "indexed": [{"key": "k1", "v": 1.5}],
    "ser": [1.0, None],
    "labelled": {"a": 1, "b": 2},
    "ts": "2026-01-01T10:00:00+00:00",
    "nat": None,
    "when": "2026-01-01T00:00:00",
    "aware": "2026-01-01T12:30:00+02:00",
    "day": "2026-01-02",
    "clock": "10:30:15",
    "dec": 1.10,
    "u": "00000000-0000-0000-0000-000000000005",
    "s": [1, 2],
    "fs": ["only"],
    "tup": [1, "two"],
    "raw": "AP9oaQ==",
    "colour": "red",
    "point": {"x": 1, "y": 2.5},
    "model": {"name": "m", "when": "2026-01-01T00:00:00"},
    "nan": None,
    "inf": None,
    "big": 2 ** 70,
    "surrogate": "\ud800",
    "deep": DEEP,
}
NAMES = list(EXPECTED)
# what upstream's json.dumps takes among them (np.float64 is a float; a tuple a list; NaN: null here)
PLAIN = {"x": 1.5, "tup": [1, "two"], "nan": None, "inf": None, "big": 2 ** 70, "surrogate": "\ud800",
         "deep": DEEP}


async def start(server, start_connector, mode, properties=None, **general):
    server.set_source_config(SOURCE, {"executionMode": mode, "workers": 1, **general})
    return await start_connector(**(properties or {}))


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_every_type_named_in_limit_return_to(server, start_connector, mode):
    await start(server, start_connector, mode)
    result = await server.query({"code": SETUP, "limitReturnTo": NAMES}, timeout=30)
    assert result.status == 200, result.body
    assert result.results == EXPECTED


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_every_type_with_result_values_rich(server, start_connector, mode):
    await start(server, start_connector, mode, resultValues="rich", returnRuntimeInformation=True)
    result = await server.query({"code": SETUP}, timeout=30)
    assert result.status == 200, result.body
    # classes and modules are code, not data: left out without a word
    assert result.results == EXPECTED
    assert result.body["connectorRuntimeInfo"]["skippedGlobals"] == []


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_default_keeps_upstreams_rule_and_lists_what_it_left_out(server, start_connector, mode):
    await start(server, start_connector, mode, returnRuntimeInformation=True)
    result = await server.query({"code": SETUP + "\nsock = object()"}, timeout=30)
    assert result.status == 200, result.body
    assert result.results == PLAIN
    skipped = {entry["name"]: entry["type"] for entry in result.body["connectorRuntimeInfo"]["skippedGlobals"]}
    assert set(skipped) == set(EXPECTED) - set(PLAIN) | {"sock"}
    assert skipped["arr"] == "numpy.ndarray" and skipped["when"] == "datetime.datetime"
    assert skipped["s"] == "set" and skipped["sock"] == "object" and skipped["df"].endswith("DataFrame")
    # the named ones are rich even so; the others keep the rule
    named = await server.query({"code": SETUP, "limitReturnTo": ["df", "n", "x"]}, timeout=30)
    assert named.results == {"df": EXPECTED["df"], "n": 7, "x": 1.5}


STREAM = SETUP + """
import asyncio
async def go():
    values = {name: globals()[name] for name in NAMES}
    await connector_connection.send_notification(values)
    await connector_connection.send_query_response(connector_context, 100, values)
    await connector_connection.send_query_response(connector_context, 200, df)
asyncio.get_event_loop().create_task(go())
"""


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_streamed_replies_and_notifications_are_rich(server, start_connector, mode):
    await start(server, start_connector, mode)
    result = await server.query({"code": STREAM, "codeHandlesReturn": True, "presetValues": {"NAMES": NAMES}},
                                timeout=30)
    assert [r["status"] for r in result.replies] == [100, 200], result.body
    assert result.replies[0]["body"] == EXPECTED
    assert result.replies[1]["body"] == EXPECTED["df"]          # send_query_response(ctx, 200, df): the rows
    assert (await server.wait_notifications(SOURCE, 1))[0] == EXPECTED


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_error_parameters_are_rich_and_odd_ones_still_go_out(server, start_connector, mode):
    await start(server, start_connector, mode)
    code = ("import numpy as np, datetime\nfrom pyexec_connector import QueryError\n"
            "raise QueryError('my.code', 'bad {0} {1} {2}', [np.int64(3), datetime.date(2026, 1, 2), object()])")
    result = await server.query({"code": code})
    assert result.status == 400 and result.error_code == "my.code"
    three, day, odd = result.body["parameters"]
    assert (three, day) == (3, "2026-01-02") and odd.startswith("<object object at")
    # through send_query_error too
    code = ("import numpy as np\nawait connector_connection.send_query_error(connector_context, "
            "{'messageCode': 'c', 'messageTemplate': '{0}', 'parameters': [np.arange(2)]})")
    result = await server.query({"code": code, "codeHandlesReturn": True})
    assert result.status == 400 and result.body["parameters"] == [[0, 1]]


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_a_named_global_that_cannot_be_encoded_is_a_400(server, start_connector, mode):
    await start(server, start_connector, mode, resultValues="rich")
    code = "import threading\nlock = threading.Lock()\nok = 1\ndef helper():\n    pass"
    result = await server.query({"code": code, "limitReturnTo": ["ok", "lock"]})
    assert result.status == 400 and result.error_code == errors.UNENCODABLE_GLOBAL
    name, kind, reason = result.body["parameters"]
    assert (name, kind) == ("lock", "_thread.lock") and "lock" in reason
    function = await server.query({"code": code, "limitReturnTo": ["helper"]})
    assert function.error_code == errors.UNENCODABLE_GLOBAL and function.body["parameters"][:2] == [
        "helper", "function"]
    # unnamed, even in "rich": left out, as upstream leaves out what it cannot encode
    assert (await server.query({"code": code})).results == {"ok": 1}


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_a_huge_dataframe_over_max_message_bytes_is_too_large_and_the_link_stays(server, start_connector,
                                                                                        mode):
    running = await start(server, start_connector, mode, {"maxMessageBytes": 1024 * 1024})
    code = ("import numpy as np, pandas as pd\nn = 100_000\n"
            "df = pd.DataFrame({'a': np.arange(n), 'b': np.arange(n) * 0.5, 'c': ['row'] * n})")
    result = await server.query({"code": code, "limitReturnTo": ["df"]}, timeout=60)
    assert result.status == 400 and result.error_code == errors.TOO_LARGE
    size, limit = result.body["parameters"]
    assert size > limit
    after = await server.query({"code": "import pandas as pd\nsmall = pd.DataFrame({'a': [1]})",
                                "limitReturnTo": ["small"]})
    assert after.results == {"small": [{"a": 1}]}
    assert running.session.link.reconnects == 0 and server.connects(SOURCE) == 1


async def test_bad_result_values_names_the_key(caplog):
    with caplog.at_level(logging.ERROR):
        config = parse_source_config({"pythonExecConfig": {"general": {"resultValues": "fancy",
                                                                       "codeCacheSize": 3}}}, "src")
    assert config.resultValues == "plain" and config.codeCacheSize == 128     # the defaults, as for any bad key
    assert any("pythonExecConfig.general.resultValues" in r.getMessage() for r in caplog.records)
    assert parse_source_config({"pythonExecConfig": {"general": {"resultValues": "rich"}}}).resultValues == "rich"


def test_numpy_and_pandas_are_not_package_dependencies_nor_imported():
    requires = metadata.requires("pyexec-connector") or []
    core = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith(("numpy", "pandas")) for r in core) and any(r.startswith("orjson") for r in core)
    probe = ("import sys, datetime, decimal\nfrom pyexec_connector import protocol, values\n"
             "print(values.dumps({'d': datetime.date(2026, 1, 1), 'x': decimal.Decimal('2.50'), 's': {3}}))\n"
             "print(protocol.reply_frame('a', 200, {'k': 1}))\n"
             "print(sorted(m for m in ('numpy', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    lines = out.stdout.splitlines()
    assert json.loads(lines[0]) == {"d": "2026-01-01", "x": 2.5, "s": [3]} and lines[0].count("2.50") == 1
    assert lines[-1] == "[]"


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_result_values_follows_a_reconfigure_that_keeps_the_workers(server, start_connector, mode):
    running = await start(server, start_connector, mode)
    code = "import datetime\nwhen = datetime.date(2026, 1, 2)\nn = 1"
    assert (await server.query({"code": code})).results == {"n": 1}
    engine = running.session.engine
    await server.reconfigure(SOURCE, {"executionMode": mode, "workers": 1, "resultValues": "rich"})
    for _ in range(100):
        if running.session.source_config.resultValues == "rich":
            break
        await asyncio.sleep(0.02)
    assert running.session.engine is engine      # same pool: the workers were told, not replaced
    # a plain query (relayed to a worker as it came, in process mode) and one sent with its code cached
    assert (await server.query({"code": code})).results == {"n": 1, "when": "2026-01-02"}
    await server.query({"code": code, "name": "cached"})
    assert (await server.query({"name": "cached"})).results == {"n": 1, "when": "2026-01-02"}


GC_DURING_ENCODING = """
import gc, pandas as pd
df = pd.DataFrame({"a": range(10_000), "b": [str(i) for i in range(10_000)]})
seen = []
def probe(phase, info):
    if phase == "start":
        seen.append(info["generation"])
gc.collect()
gc.callbacks.append(probe)
try:
    await connector_connection.send_query_response(connector_context, 100, df)
finally:
    gc.callbacks.remove(probe)
enabled_after = gc.isenabled()
gc.disable()
await connector_connection.send_query_response(connector_context, 100, df.head(2))
disabled_stays = not gc.isenabled()
gc.enable()
await connector_connection.send_query_response(connector_context, 200, {
    "collections": seen, "enabled_after": enabled_after, "disabled_stays": disabled_stays})
"""


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_encoding_a_dataframe_triggers_no_garbage_collection(server, start_connector, mode):
    """Its 10,000 row dicts are made and freed within the encoding and hold no cycles: the GC is paused
    meanwhile (a collection would only scan them), and left as the code had it."""
    await start(server, start_connector, mode)
    result = await server.query({"code": GC_DURING_ENCODING, "codeHandlesReturn": True}, timeout=30)
    assert [r["status"] for r in result.replies] == [100, 100, 200], result.body
    assert len(result.replies[0]["body"]) == 10_000
    assert result.replies[-1]["body"] == {"collections": [], "enabled_after": True, "disabled_stays": True}


def test_the_dataframe_fast_path_still_exists_and_agrees_with_items():
    """values._column_lists relies on pandas' private DataFrame._get_column_array (with items() as the
    fallback): a pandas upgrade that drops it must fail here, not show up as a silent slowdown."""
    pd = pytest.importorskip("pandas")
    assert hasattr(pd.DataFrame, "_get_column_array"), \
        "pandas has no DataFrame._get_column_array: values._column_lists falls back to items() (slower)"
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", None], "c": pd.to_datetime(["2026-01-01", None])})
    frame.columns = ["a", "a", "c"]     # duplicate names: by position, not by name
    assert [frame._get_column_array(i).tolist() for i in range(3)] == \
        [column.tolist() for _, column in frame.items()]

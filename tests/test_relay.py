"""The process engine's relay path (plain query frames go to a worker as they came), a worker holding
several queries, the relay wire format, and the cap on message_code metric labels: the real connector over
real loopback websockets against devserver.py, and the real wire functions."""
from __future__ import annotations

import asyncio
import time

import pytest

from pyexec_connector import errors, querylog
from pyexec_connector.engine import process, wire
from pyexec_connector.engine.messages import ACKED, Relay

from .conftest import SOURCE

PIDS = "import asyncio, os\npid = os.getpid()\nawait asyncio.sleep(0.2)"


class RelayCounter:
    """Which way queries reached the workers since it was made: relayed as they came, or parsed by the
    connector (declined), from the engine's stats()."""

    def __init__(self, engine: process.ProcessEngine):
        self._engine = engine
        stats = engine.stats()
        self._relayed, self._parsed = stats.relayed, stats.parsed

    @property
    def relayed(self) -> int:
        return self._engine.stats().relayed - self._relayed

    @property
    def declined(self) -> int:
        return self._engine.stats().parsed - self._parsed


async def start_process(server, start_connector, **general):
    """A connector in process mode whose workers are up (a first query was parsed and waited for them),
    with a RelayCounter on its engine."""
    server.set_source_config(SOURCE, {"executionMode": "process", "workers": 1, **general})
    running = await start_connector()
    assert isinstance(running.session.engine, process.ProcessEngine)
    assert (await server.query({"code": "warm = 1"})).results == {"warm": 1}
    return running, RelayCounter(running.session.engine)


async def gather_replies(server, addresses, timeout=10.0):
    return await asyncio.gather(*(server.replies_for(a, timeout) for a in addresses))


# ---- 1a. results of relayed queries ------------------------------------------------------------

async def test_relayed_query_applies_preset_values(server, start_connector):
    _, relays = await start_process(server, start_connector)
    result = await server.query({"code": "b = a + 1", "presetValues": {"a": 1}})
    assert result.status == 200 and result.results == {"a": 1, "b": 2}
    assert relays.relayed == 1 and relays.declined == 0


@pytest.mark.parametrize("limit", [["b", "c"], "b, c", "b,c"])
async def test_relayed_query_limits_its_results(server, start_connector, limit):
    _, relays = await start_process(server, start_connector)
    result = await server.query({"code": "b = a + 1\nc = 'see'\nd = 4", "presetValues": {"a": 1},
                                 "limitReturnTo": limit})
    assert result.status == 200 and result.results == {"b": 2, "c": "see"}
    assert relays.relayed == 1


async def test_relayed_capture_output_holds_only_that_runs_prints(server, start_connector):
    _, relays = await start_process(server, start_connector)
    assert (await server.query({"code": "print('not captured')\nq = 0"})).status == 200
    code = "import asyncio\nprint(tag)\nawait asyncio.sleep(0.1)\nprint(tag, file=__import__('sys').stderr)"
    addresses = [await server.send_query(SOURCE, {"code": code, "presetValues": {"tag": tag}, "captureOutput": True})
                 for tag in ("AAA", "BBB")]    # both at once in the one worker, printing in turn
    first, second = await gather_replies(server, addresses)
    assert first.status == 200 and first.body["pythonOutput"] == {"stdout": "AAA\n", "stderr": "AAA\n"}
    assert second.status == 200 and second.body["pythonOutput"] == {"stdout": "BBB\n", "stderr": "BBB\n"}
    assert first.results["tag"] == "AAA" and second.results["tag"] == "BBB"
    plain = await server.query({"code": "print('quiet')\nr = 1"})
    assert plain.results == {"r": 1} and "pythonOutput" not in plain.body
    assert relays.relayed == 4 and relays.declined == 0


# ---- 1b. WITH-clause errors found in the worker ----------------------------------------------------

@pytest.mark.parametrize("params, code", [
    ({"code": "x = 1", "presetValues": 5}, errors.BAD_GLOBAL_PRESET),
    ({"code": "x = 1", "presetValues": [1, 2]}, errors.BAD_GLOBAL_PRESET),
    ({"code": "x = 1", "limitReturnTo": ["x"], "codeHandlesReturn": True}, errors.CONFLICTING_RETURN),
    ({"code": "x = 1", "captureOutput": True, "codeHandlesReturn": True}, errors.CONFLICTING_RETURN),
    ({"code": "x = 1", "limitReturnTo": 7}, errors.BAD_RETURN_VALUES),
])
async def test_with_clause_errors_found_in_the_worker_are_400s(server, start_connector, params, code):
    _, relays = await start_process(server, start_connector)
    result = await server.query(params)
    assert result.status == 400 and result.error_code == code
    assert relays.relayed == 1
    assert (await server.query({"code": "after = 1"})).results == {"after": 1}


async def test_a_refused_query_does_not_make_its_name_known(server, start_connector):
    _, relays = await start_process(server, start_connector)
    refused = await server.query({"name": "n1", "code": "x = 1", "presetValues": 5})
    assert refused.status == 400 and refused.error_code == errors.BAD_GLOBAL_PRESET
    assert relays.relayed == 1
    name_only = await server.query({"name": "n1"})
    assert name_only.status == 400 and name_only.error_code == errors.NO_CACHE
    assert relays.declined == 1     # the name is unknown: it went through run(), which answered


async def test_a_relayed_query_that_does_not_compile_does_not_make_its_name_known(server, start_connector):
    _, relays = await start_process(server, start_connector)
    broken = await server.query({"name": "n3", "code": "x = ("})
    assert broken.status == 400 and broken.error_code == errors.SYNTAX_ERROR
    assert relays.relayed == 1
    assert (await server.query({"name": "n3"})).error_code == errors.NO_CACHE


# ---- 1c. name-only queries ------------------------------------------------------------------------

async def test_name_only_after_a_successful_run(server, start_connector):
    _, relays = await start_process(server, start_connector)
    assert (await server.query({"name": "n2", "code": "y = 2"})).results == {"y": 2}
    result = await server.query({"name": "n2"})
    assert result.status == 200 and result.results == {"y": 2}
    assert relays.relayed == 2 and relays.declined == 0


async def test_name_only_queries_run_on_any_worker(server, start_connector):
    running, relays = await start_process(server, start_connector, workers=2, minWorkers=2)
    assert running.session.engine.stats().workers_alive == 2
    first = await server.query({"name": "pids", "code": PIDS})     # an idle pool: the first worker runs it
    assert first.status == 200
    for _ in range(3):              # one after another: each an idle pool again
        result = await server.query({"name": "pids"})
        assert result.status == 200 and result.results["pid"] == first.results["pid"]
    # while synchronous code holds the first worker's loop, name-only queries go to the other one, which
    # never saw the code: the connector sends the text it knows the name by
    hog = await server.send_query(SOURCE, {"code": "import time\ntime.sleep(1.5)\nhog = 1"})
    await asyncio.sleep(0.2)
    addresses = [await server.send_query(SOURCE, {"name": "pids"}) for _ in range(6)]
    results = await gather_replies(server, addresses)
    assert [r.status for r in results] == [200] * 6
    assert first.results["pid"] not in {r.results["pid"] for r in results}
    assert (await server.replies_for(hog, 30)).results == {"hog": 1}
    assert relays.relayed == 11 and relays.declined == 0


# ---- 1d/1e. what is not relayed still works, and is not relayed -------------------------------------

async def test_query_with_a_timeout_is_not_relayed_and_times_out(server, start_connector):
    running, relays = await start_process(server, start_connector)
    began = time.monotonic()
    result = await server.query({"code": "import asyncio\nawait asyncio.sleep(5)\nlate = 1", "timeout": 0.5})
    assert result.status == 400 and result.error_code == errors.TIMEOUT
    assert result.body["parameters"] == [0.5]
    assert time.monotonic() - began < 4
    assert relays.relayed == 0 and relays.declined == 1
    engine = running.session.engine     # the worker lets go of the timed-out query: plain ones are relayed again
    async with asyncio.timeout(5):
        while any(w.cancelling or w.inflight for w in engine.pool.workers):
            await asyncio.sleep(0.02)
    assert (await server.query({"code": "next_one = 1"})).results == {"next_one": 1}
    assert relays.relayed == 1


async def test_dry_run_is_not_relayed(server, start_connector):
    _, relays = await start_process(server, start_connector)
    result = await server.query({"code": "x = 1", "dryRun": True})
    assert result.status == 200 and result.results == {}
    assert result.body["dryRun"]["compiled"] is True
    assert relays.relayed == 0 and relays.declined == 1


async def test_replace_is_not_relayed_and_replaces(server, start_connector):
    _, relays = await start_process(server, start_connector)
    assert (await server.query({"name": "r", "code": "v = 1"})).results == {"v": 1}
    assert relays.relayed == 1
    replaced = await server.query({"name": "r", "code": "v = 2", "replace": True})
    assert replaced.status == 200 and replaced.results == {"v": 2}
    assert relays.relayed == 1 and relays.declined == 1
    assert (await server.query({"name": "r"})).results == {"v": 2}
    assert relays.relayed == 2


async def test_script_document_is_not_relayed(server, start_connector):
    _, relays = await start_process(server, start_connector)
    server.put_document("relay_doc.py", "w = 3")
    result = await server.query({"script": "relay_doc.py"})
    assert result.status == 200 and result.results == {"w": 3}
    assert relays.relayed == 0 and relays.declined == 1


# ---- 1f. the source's executionTimeout applies to relayed queries -------------------------------------

async def test_relayed_query_times_out_by_the_sources_execution_timeout(server, start_connector):
    _, relays = await start_process(server, start_connector, executionTimeout=0.3)
    # synchronous code: the worker cannot let go before the sleep ends; had the timeout not applied, the
    # answer would be a 200 once it does
    result = await server.query({"code": "import time\ntime.sleep(1.2)\nslept = True"})
    assert result.status == 400 and result.error_code == errors.TIMEOUT
    assert result.body["parameters"] == [0.3]
    assert relays.relayed == 1
    # the worker holds on to the stuck query until it is killed (KILL_GRACE): a next query waiting that
    # long with the source's 0.3 s would be busy (dispatch.py); with its own timeout it waits for it
    assert (await server.query({"code": "served = 1", "timeout": 10}, timeout=10)).results == {"served": 1}


# ---- 1g. stopping ----------------------------------------------------------------------------------

async def test_relayed_query_running_at_stop_is_answered_shutting_down(server, start_connector):
    running, relays = await start_process(server, start_connector)
    address = await server.send_query(SOURCE, {"code": "import asyncio\nawait asyncio.sleep(30)"})
    await asyncio.sleep(0.2)
    assert relays.relayed == 1
    stopping = asyncio.create_task(running.stop())
    result = await server.replies_for(address, timeout=10)
    await stopping
    assert result.status == 400 and result.error_code == errors.SHUTTING_DOWN


# ---- 2. a worker holds several queries (the pipe itself: tests/test_channel.py) --------------------------

async def test_a_worker_awaiting_in_a_query_still_asks_for_work(server, start_connector):
    running, relays = await start_process(server, start_connector)
    engine = running.session.engine
    address = await server.send_query(SOURCE, {"code": "import asyncio\nawait asyncio.sleep(1)\nslow = 1"})
    started = time.monotonic()
    assert (await server.query({"code": "quick = 1"})).results == {"quick": 1}
    assert time.monotonic() - started < 0.8, "the quick query waited for the slow one"
    assert (await server.replies_for(address)).results == {"slow": 1}
    assert relays.relayed == 2
    assert engine.stats().credit_overdrawn == 0


@pytest.mark.parametrize("per_worker", [16, 1000])
async def test_a_burst_of_queries_on_one_worker_is_all_answered(server, start_connector, per_worker):
    _, relays = await start_process(server, start_connector, queriesPerWorker=per_worker)
    addresses = [await server.send_query(SOURCE, {"code": "y = x * 2", "presetValues": {"x": i}}) for i in range(200)]
    results = await gather_replies(server, addresses, timeout=30)
    assert [r.status for r in results] == [200] * 200
    assert [r.results for r in results] == [{"x": i, "y": 2 * i} for i in range(200)]
    assert relays.relayed + relays.declined == 200 and relays.relayed >= 1


# ---- 3. the relay wire format ---------------------------------------------------------------------

RAW = '{"op": "query", "object": {"code": "größe = \'✓\'"}}'.encode()


@pytest.mark.parametrize("qid", [1, 2 ** 40 + 3])
@pytest.mark.parametrize("address", ["reply-1", "", "Antwort/größe-\u00e9-\U0001f600"])
@pytest.mark.parametrize("text", [None, "", "x = 1", "s = '\U0001f600 ü'\n"])
@pytest.mark.parametrize("raw", [RAW, b""])
def test_relay_messages_round_trip(qid, address, text, raw):
    packed = wire.encode(Relay(qid, address, text, raw))
    assert int.from_bytes(packed[:4], "big") == len(packed) - 4
    decoded = wire.decode(packed[4:], trusted=True)
    assert decoded == Relay(qid, address, text, raw) and type(decoded) is Relay
    assert (decoded.text is None) == (text is None)
    assert isinstance(decoded.raw, bytes)


def test_relay_messages_are_decoded_only_from_the_connector():
    packed = wire.encode(Relay(5, "reply-5", "x = 1", RAW))
    with pytest.raises(wire.MalformedMessage):
        wire.decode(packed[4:], trusted=False)
    assert type(wire.decode(memoryview(packed)[4:], trusted=True)) is Relay


def test_ack_decodes_to_acked():
    assert int.from_bytes(wire.ACK[:4], "big") == len(wire.ACK) - 4 == 1
    assert wire.decode(wire.ACK[4:], trusted=False) is ACKED
    assert wire.decode(memoryview(wire.ACK)[4:], trusted=False) is ACKED
    assert wire.encode(ACKED) == wire.ACK


# ---- 4. the cap on message_code labels ------------------------------------------------------------

async def test_message_codes_beyond_the_cap_are_counted_as_other(server, start_connector, monkeypatch):
    monkeypatch.setattr(querylog, "MAX_MESSAGE_CODES", 3)
    running, relays = await start_process(server, start_connector)
    code = "from pyexec_connector import QueryError\nraise QueryError(f'my.code.{i}', 'bad {0}', [i])"
    for i in range(7):
        result = await server.query({"code": code, "presetValues": {"i": i}})
        assert result.status == 400 and result.error_code == f"my.code.{i}"
        assert result.body["parameters"] == [i]
    again = await server.query({"code": code, "presetValues": {"i": 0}})     # a code with its own label
    assert again.error_code == "my.code.0"
    assert relays.relayed == 8
    registry = running.connector.metrics.registry

    def sample(name, **labels):
        return registry.get_sample_value(name, {"source": SOURCE, **labels})

    assert sample("pyexec_query_errors_total", message_code="my.code.0") == 2
    assert sample("pyexec_query_errors_total", message_code="my.code.1") == 1
    assert sample("pyexec_query_errors_total", message_code="my.code.2") == 1
    for i in range(3, 7):
        assert sample("pyexec_query_errors_total", message_code=f"my.code.{i}") is None
    assert sample("pyexec_query_errors_total", message_code=querylog.OTHER_CODE) == 4
    assert sample("pyexec_queries_total", outcome="error") == 8
    assert sample("pyexec_queries_total", outcome="ok") == 1     # the warm-up query
    assert sample("pyexec_query_duration_seconds_count") == 9
    assert sample("pyexec_query_duration_seconds_bucket", le="+Inf") == 9


async def test_a_query_whose_relay_fails_is_still_answered(server, start_connector, monkeypatch):
    """A bug on the relay path must not cost the query its reply: it runs the ordinary way."""
    _, relays = await start_process(server, start_connector)
    encode_run = wire.encode_run

    def broken(message, take_by):
        if type(message) is Relay:
            raise RuntimeError("relay bug")
        return encode_run(message, take_by)

    monkeypatch.setattr(wire, "encode_run", broken)
    result = await server.query({"code": "y = x * 2", "presetValues": {"x": 21}}, timeout=5)
    assert result.status == 200 and result.results == {"x": 21, "y": 42}
    assert relays.relayed == 0 and relays.declined == 1



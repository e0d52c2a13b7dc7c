"""Queries through the real connector and a real loopback websocket to devserver.py."""
import asyncio
import json

import pytest

from pyexec_connector import errors

from .conftest import SOURCE, example


@pytest.fixture(params=["process", "inline"])
def mode(request):
    """Every query test runs in both execution modes."""
    return request.param


@pytest.fixture
async def connected(server, start_connector, mode):
    # one worker: spawning costs time on a shared machine; test_engine.py covers several workers, and the
    # tests below that configure the source themselves run with the default pool
    server.set_source_config(SOURCE, {"executionMode": mode, "workers": 1})
    running = await start_connector()
    return server, running


async def test_globals_are_returned(connected):
    server, _ = connected
    result = await server.query({"code": "import math\nx = a + 1\nroot = math.sqrt(x)\nf = lambda: 1\ns = {1}",
                                 "presetValues": {"a": 3}})
    assert result.status == 200
    assert result.body == {"pythonCallResults": {"a": 3, "x": 4, "root": 2.0}}


async def test_globals_result_example_unchanged(connected):
    server, _ = connected
    result = await server.query({"code": example("globals_result.py"), "name": "globals_result.py",
                                 "presetValues": {"loop_count": 3}})
    assert result.status == 200
    results = result.results
    assert set(results) == {"loop_count", "items", "total", "i", "working_directory"}
    assert results["total"] == 3 and results["i"] == 2 and len(results["items"]) == 3


async def test_globals_result_example_from_document(connected):
    server, _ = connected
    server.put_document("examples/globals_result.py", example("globals_result.py"))
    result = await server.query({"script": "examples/globals_result.py", "presetValues": {"loop_count": 4}})
    assert result.status == 200, result.body
    assert result.results["total"] == 6
    assert "math" not in result.results and "helper" not in result.results


@pytest.mark.parametrize("from_document", [False, True])
async def test_stream_rows_example_unchanged(connected, from_document):
    server, _ = connected
    if from_document:
        server.put_document("stream_rows.py", example("stream_rows.py"))
        params = {"script": "stream_rows.py"}
    else:
        params = {"code": example("stream_rows.py"), "name": "stream_rows.py"}
    params.update(codeHandlesReturn=True, presetValues={"row_count": 5})
    result = await server.query(params)
    assert [r["status"] for r in result.replies] == [100, 100, 100, 100, 200]
    assert [r["body"]["row"] for r in result.replies] == [0, 1, 2, 3, 4]
    assert all(r["body"]["source"] == SOURCE for r in result.replies)
    notes = await server.wait_notifications(SOURCE, 1)
    assert notes[0]["rows"] == 5


async def test_file_is_the_given_name_and_globals_are_fresh(connected):
    server, _ = connected
    first = await server.query({"code": "where = __file__\nmain = __name__\nleft_behind = 1", "name": "my/code.py"})
    assert first.results == {"where": "my/code.py", "main": "__main__", "left_behind": 1}
    second = await server.query({"code": "seen = 'left_behind' in globals()", "name": "other.py"})
    assert second.results == {"seen": False}


async def test_limit_return_to(connected):
    server, _ = connected
    result = await server.query({"code": "a = 1\nb = 2\nc = 3", "limitReturnTo": "a, c, missing"})
    assert result.results == {"a": 1, "c": 3}
    result = await server.query({"code": "a = 1\nb = 2", "limitReturnTo": ["b"]})
    assert result.results == {"b": 2}


async def test_non_json_values_are_skipped(connected):
    server, _ = connected
    code = ("import datetime\nnow = datetime.datetime.now()\nnan = float('nan')\nloop = []\nloop.append(loop)\n"
            "ok = {'k': [1, 2.5, None, True]}\ntup = (1, 2)")
    result = await server.query({"code": code})
    # NaN has no JSON form: null (upstream writes a bare NaN, which is not JSON)
    assert result.results == {"ok": {"k": [1, 2.5, None, True]}, "tup": [1, 2], "nan": None}


@pytest.mark.parametrize("params, code", [
    ({"code": "x=1", "limitReturnTo": 7}, errors.BAD_RETURN_VALUES),
    ({"code": "x=1", "limitReturnTo": ["x"], "codeHandlesReturn": True}, errors.CONFLICTING_RETURN),
    ({"code": "x=1", "presetValues": [1]}, errors.BAD_GLOBAL_PRESET),
    ({"presetValues": {"a": 1}}, errors.NO_CODE),
    ({"name": "never-cached"}, errors.NO_CACHE),
    ([1, 2, 3], errors.BAD_QUERY),
    (None, errors.BAD_QUERY),
    ({"code": 12}, errors.BAD_PARAMETER),
])
async def test_query_errors(connected, params, code):
    server, _ = connected
    result = await server.query(params)
    assert result.status == 400
    assert result.error_code == code
    assert isinstance(result.body["messageTemplate"], str) and isinstance(result.body["parameters"], list)


async def test_syntax_error_parameters(connected):
    server, _ = connected
    result = await server.query({"code": "x = 1\ny = (2 +\n", "name": "broken.py"})
    assert result.error_code == errors.SYNTAX_ERROR
    kind, filename, line, offset, _text = result.body["parameters"]
    assert (kind, filename) == ("SyntaxError", "broken.py") and line in (2, 3)
    assert isinstance(offset, int)


async def test_execution_exception_has_type_and_traceback(connected):
    server, _ = connected
    result = await server.query({"code": "def f():\n    return 1/0\nf()", "name": "boom.py"})
    assert result.error_code == errors.EXECUTION_EXCEPTION
    kind, trace = result.body["parameters"]
    assert kind == "ZeroDivisionError"
    assert 'File "boom.py", line 2, in f' in trace and "pyexec_connector" not in trace


async def test_user_query_error(connected):
    server, _ = connected
    code = "from pyexec_connector import QueryError\nraise QueryError('my.app.code', 'bad value {0}', [x])"
    result = await server.query({"code": code, "presetValues": {"x": 42}})
    assert result.status == 400
    assert result.body == {"messageCode": "my.app.code", "messageTemplate": "bad value {0}", "parameters": [42]}


async def test_system_exit_is_caught(connected):
    server, _ = connected
    result = await server.query({"code": "import sys\nsys.exit(3)"})
    assert result.error_code == errors.EXECUTION_EXCEPTION
    assert result.body["parameters"][0] == "SystemExit"
    assert (await server.query({"code": "ok = True"})).results == {"ok": True}


async def test_top_level_await(connected):
    server, _ = connected
    result = await server.query({"code": "import asyncio\nawait asyncio.sleep(0.01)\nvalue = 5"})
    assert result.results == {"value": 5}


async def test_code_handles_return_without_reply_is_an_error(connected):
    server, _ = connected
    result = await server.query({"code": "x = 1", "codeHandlesReturn": True})
    assert result.error_code == errors.NO_REPLY
    code = ("import asyncio\nasync def go():\n    await asyncio.sleep(0.01)\n    raise ValueError('late')\n"
            "asyncio.get_event_loop().create_task(go())")
    result = await server.query({"code": code, "codeHandlesReturn": True})
    assert result.error_code == errors.EXECUTION_EXCEPTION
    assert result.body["parameters"][0] == "ValueError"


async def test_code_handles_return_api(connected):
    server, _ = connected
    code = ("import asyncio\n"
            "async def go():\n"
            "    cfg = connector_connection.get_server_config()\n"
            "    await connector_connection.send_query_response(connector_context, 100, [{'a': 1}, {'a': 2}])\n"
            "    try:\n"
            "        await connector_connection.send_query_response(connector_context, 201, {})\n"
            "    except RuntimeError as exc:\n"
            "        bad = str(exc)\n"
            "    await connector_connection.send_query_response(connector_context, 200,\n"
            "        {'keys': sorted(cfg), 'bad': bad, 'ctx': sorted(connector_context),\n"
            "         'healthy': connector_connection.is_healthy()})\n"
            "asyncio.get_event_loop().create_task(go())")
    result = await server.query({"code": code, "codeHandlesReturn": True})
    assert result.replies[0] == {"status": 100, "headers": {"X-Reply-Address": result.replies[0]["headers"][
        "X-Reply-Address"]}, "body": [{"a": 1}, {"a": 2}]}
    final = result.body
    assert "authToken" not in final["keys"] and "targetServer" in final["keys"]
    assert "status must be 100, 200 or 204" in final["bad"]
    assert final["ctx"] == ["response_address", "source_name"]
    assert final["healthy"] is None


async def test_code_handles_return_error_and_empty(connected):
    server, _ = connected
    code = ("await connector_connection.send_query_error(connector_context, {'messageCode': 'x.y', "
            "'messageTemplate': 'no {0}', 'parameters': ['luck']})")
    result = await server.query({"code": code, "codeHandlesReturn": True})
    assert result.body == {"messageCode": "x.y", "messageTemplate": "no {0}", "parameters": ["luck"]}
    result = await server.query({"code": "await connector_connection.send_query_response(connector_context, 204,"
                                          " None)", "codeHandlesReturn": True})
    assert result.status == 204 and "body" not in result.replies[-1]


async def test_only_one_terminal_reply(connected):
    server, _ = connected
    code = ("await connector_connection.send_query_response(connector_context, 200, {'n': 1})\n"
            "await connector_connection.send_query_response(connector_context, 200, {'n': 2})")
    result = await server.query({"code": code, "codeHandlesReturn": True})
    assert result.body == {"n": 1}
    await asyncio.sleep(0.1)
    assert server.stray_replies == []


async def test_runtime_information(server, start_connector, mode):
    server.set_source_config(SOURCE, {"executionMode": mode, "returnRuntimeInformation": True, "codeCacheSize": 2})
    await start_connector()
    first = await server.query({"code": "x = 1", "name": "a"})
    info = first.body["connectorRuntimeInfo"]
    assert set(info) == {"totalTime", "executionTime", "compileTime", "currentCacheSize", "cacheCapacity",
                         "using_cached", "newCacheEntry", "name", "query_time", "skippedGlobals"}
    assert info["query_time"] == info["totalTime"]
    assert info["skippedGlobals"] == []
    assert info["using_cached"] is False and info["newCacheEntry"] is True and info["name"] == "a"
    assert info["cacheCapacity"] == 2 and info["currentCacheSize"] == 1
    again = (await server.query({"code": "x = 1", "name": "a"})).body["connectorRuntimeInfo"]
    assert again["using_cached"] is True and again["newCacheEntry"] is False and "compileTime" not in again
    assert again["totalTime"] >= again["executionTime"] >= 0


async def test_runtime_information_without_a_name_has_no_name(server, start_connector, mode):
    """As upstream: `name` only when the query has one."""
    server.set_source_config(SOURCE, {"executionMode": mode, "workers": 1, "returnRuntimeInformation": True})
    await start_connector()
    assert "name" not in (await server.query({"code": "x = 1"})).body["connectorRuntimeInfo"]


async def test_no_runtime_information_by_default(connected):
    server, _ = connected
    assert "connectorRuntimeInfo" not in (await server.query({"code": "x = 1"})).body


async def runtime(server, params):
    return (await server.query(params)).body["connectorRuntimeInfo"]


async def test_code_cache_rules(server, start_connector, mode):
    server.set_source_config(SOURCE, {"executionMode": mode, "returnRuntimeInformation": True, "codeCacheSize": 2})
    await start_connector()
    assert (await runtime(server, {"code": "v = 1", "name": "n"}))["newCacheEntry"] is True
    # name only: the cached code runs
    assert (await server.query({"name": "n"})).results == {"v": 1}
    # changed text under the same name: recompiled, not the stale entry
    info = await runtime(server, {"code": "v = 2", "name": "n"})
    assert info["using_cached"] is False and info["newCacheEntry"] is True
    assert (await server.query({"name": "n"})).results == {"v": 2}
    # replace drops the entry first
    info = await runtime(server, {"code": "v = 2", "name": "n", "replace": "true"})
    assert info["using_cached"] is False
    # cache_code false: compiled, not stored
    info = await runtime(server, {"code": "w = 1", "name": "m", "cache_code": False})
    assert info["newCacheEntry"] is False
    assert (await server.query({"name": "m"})).error_code == errors.NO_CACHE
    # LRU of capacity 2: a third name evicts the least recently used
    await server.query({"code": "a = 1", "name": "a"})
    await server.query({"code": "b = 1", "name": "b"})
    assert (await server.query({"name": "n"})).error_code == errors.NO_CACHE
    assert (await runtime(server, {"name": "b"}))["currentCacheSize"] == 2


async def test_reconfigure_rebuilds_the_cache(server, start_connector, mode):
    server.set_source_config(SOURCE, {"executionMode": mode, "returnRuntimeInformation": True, "codeCacheSize": 5})
    await start_connector()
    await server.query({"code": "a = 1", "name": "a"})
    await server.reconfigure(SOURCE, {"executionMode": mode, "returnRuntimeInformation": True, "codeCacheSize": 9})
    await asyncio.sleep(0.1)
    info = await runtime(server, {"code": "a = 1", "name": "a"})
    assert info["cacheCapacity"] == 9 and info["using_cached"] is False


async def test_concurrent_queries_each_answered(connected):
    server, _ = connected
    code = "import asyncio\nawait asyncio.sleep(0.05)\nout = n * 2"
    addresses = [await server.send_query(SOURCE, {"code": code, "name": "c", "presetValues": {"n": n}})
                 for n in range(50)]
    results = [await server.replies_for(a) for a in addresses]
    assert [r.results["out"] for r in results] == [n * 2 for n in range(50)]


async def test_big_preset_values(connected):
    server, _ = connected
    blob = "x" * (3 * 1024 * 1024)
    result = await server.query({"code": "size = len(blob)", "presetValues": {"blob": blob},
                                 "limitReturnTo": ["size"]}, timeout=30)
    assert result.results == {"size": len(blob)}


async def test_reply_body_is_valid_json_for_unicode(connected):
    server, _ = connected
    result = await server.query({"code": "s = 'héllo ✓ \\u2028'"})
    assert result.results == {"s": "héllo ✓ \u2028"}
    assert json.loads(json.dumps(result.body))


async def test_context_variables_set_by_one_query_are_not_seen_by_the_next(connected):
    """Each query's code runs in a context of its own, as code in a task of its own does: what it sets in
    a ContextVar (decimal's context is one) is gone for the next query, whether it awaits or not."""
    server, _ = connected
    setter = ("import contextvars, decimal, sys\n"
              "var = sys.modules.setdefault('shared_var', contextvars.ContextVar('shared_var', default='unset'))\n"
              "var.set('set by a query')\n"
              "decimal.setcontext(decimal.Context(prec=3))\n")
    reader = ("import decimal, sys\n"
              "seen = sys.modules['shared_var'].get()\n"
              "third = str(decimal.Decimal(1) / 3)\n")
    for code in (setter, "import asyncio\nawait asyncio.sleep(0)\n" + setter):
        assert (await server.query({"code": code})).status == 200
        for read in (reader, "import asyncio\nawait asyncio.sleep(0)\n" + reader):
            result = await server.query({"code": read})
            assert result.status == 200, result.body
            results = result.body["pythonCallResults"]
            assert results["seen"] == "unset"
            assert results["third"] == "0.3333333333333333333333333333"

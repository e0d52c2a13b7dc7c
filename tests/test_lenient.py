"""`code` with `script`, and `script` with another `name`: run as upstream 1.3.4 runs them (with one warning
per source and pair), or refused with strictParameters: true. In both execution modes."""
import logging

import pytest

from pyexec_connector import errors
from pyexec_connector.request import parse_query

from .conftest import SOURCE

DOC = "who = __file__\ntwice = n * 2"


@pytest.fixture(params=["process", "inline"])
def mode(request):
    return request.param


async def _start(server, start_connector, mode, **general):
    server.set_source_config(SOURCE, {"executionMode": mode, "workers": 1, "returnRuntimeInformation": True,
                                      **general})
    server.put_document("python1.py", DOC)
    await start_connector()


def _warnings(caplog, text):
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


async def test_script_with_another_name_runs_the_document_under_the_scripts_name(server, start_connector, mode,
                                                                                  caplog):
    # upstream's own test sends exactly this: {script: "python1.py", name: "pythonScript0"}
    await _start(server, start_connector, mode)
    caplog.set_level(logging.WARNING, logger="pyexec_connector")
    for n in (1, 2, 3):
        result = await server.query({"script": "python1.py", "name": "pythonScript0", "presetValues": {"n": n}})
        assert result.status == 200, result.body
        assert result.results["twice"] == 2 * n and result.results["who"] == "python1.py"
        assert result.body["connectorRuntimeInfo"]["name"] == "python1.py"
    assert len(_warnings(caplog, "'pythonScript0'")) == 1          # once per source and pair
    await server.query({"script": "python1.py", "name": "other", "presetValues": {"n": 1}})
    assert len(_warnings(caplog, "'other'")) == 1


async def test_code_with_script_runs_the_code(server, start_connector, mode, caplog):
    await _start(server, start_connector, mode)
    caplog.set_level(logging.WARNING, logger="pyexec_connector")
    for _ in range(2):
        result = await server.query({"code": "x = 5\nwho = __file__", "script": "python1.py"})
        assert result.status == 200, result.body
        assert result.results == {"x": 5, "who": "<query code>"}      # the document did not run
    named = await server.query({"code": "x = 6", "script": "python1.py", "name": "mine.py"})
    assert named.results == {"x": 6} and named.body["connectorRuntimeInfo"]["name"] == "mine.py"
    assert (await server.query({"name": "mine.py"})).results == {"x": 6}    # cached under the name, as upstream
    # once per source and (script, name) pair: the two repeats without a name, then the named one
    assert len(_warnings(caplog, "both code and script 'python1.py'")) == 2


@pytest.mark.parametrize("params, code", [
    ({"script": "python1.py", "name": "pythonScript0", "presetValues": {"n": 1}}, errors.AMBIGUOUS_NAME),
    ({"code": "x = 5", "script": "python1.py"}, errors.AMBIGUOUS_CODE),
])
async def test_strict_parameters_refuses_both(server, start_connector, mode, params, code):
    await _start(server, start_connector, mode, strictParameters=True)
    result = await server.query(params)
    assert result.status == 400 and result.error_code == code
    assert "strictParameters" in result.body["messageTemplate"]
    # the same name as the script is not ambiguous, strict or not
    same = await server.query({"script": "python1.py", "name": "python1.py", "presetValues": {"n": 2}})
    assert same.results["twice"] == 4


@pytest.mark.parametrize("params", [
    {"code": "x=1"}, {"code": "x=1", "name": "a"}, {"name": "a"}, {"code": "x", "presetValues": {"a": 1}},
    {"code": "x=1", "limitReturnTo": "x", "captureOutput": "yes"}, {"code": "x=1", "codeHandlesReturn": True},
])
def test_strictness_does_not_change_queries_without_script(params):
    """The worker parses relayed frames (which never hold `script`) strictly: the same request either way."""
    assert parse_query(params, strict=True) == parse_query(params, strict=False)

"""Drop-in check: the same queries through upstream vantiqPythonExecConnector 1.3.4 and through ours,
against the same devserver. Runs when upstream is installed (PYEXEC_UPSTREAM names its command, or
/work/upstream-venv has it: `python -m venv /work/upstream-venv &&
/work/upstream-venv/bin/pip install vantiqpythonexecconnector==1.3.4`); skipped otherwise."""
import asyncio
import os
from pathlib import Path

import pytest

from .conftest import SOURCE, TOKEN, console_command, example

UPSTREAM = Path(os.environ.get("PYEXEC_UPSTREAM", "/work/upstream-venv/bin/vantiqPythonExecConnector"))

QUERIES = [
    {"code": "import math\nx = a + 1\nr = math.sqrt(4)\nf = lambda: 1", "presetValues": {"a": 3}},
    {"code": example("globals_result.py"), "name": "g.py", "presetValues": {"loop_count": 3}},
    # what plain JSON cannot encode is left out, nested or not; the rest (big ints, tuples...) kept
    {"code": "import datetime, decimal, uuid, enum\nwhen = datetime.datetime(2026, 1, 1)\ns = {1}\n"
             "dec = decimal.Decimal('1.1')\nu = uuid.UUID(int=1)\nobj = object()\nok = [1, (2, 3)]\nbig = 2 ** 70\n"
             "inside = {'d': datetime.date(2026, 1, 1)}\nb = b'x'\nclass E(enum.Enum):\n    A = 1\ne = E.A\n"
             "class I(enum.IntEnum):\n    B = 2\ni = I.B"},
    {"code": "x=1\ny=2", "limitReturnTo": "x"},
    {"code": "x=1\ny=2", "limitReturnTo": ["y"]},
    {"code": "x = 1/0"},
    {"code": "x = (", "name": "bad.py"},
    {"name": "nothing-cached"},
    {"code": "x=1", "presetValues": [1]},
    {"code": "x=1", "limitReturnTo": 5},
    {"code": "x=1", "limitReturnTo": ["x"], "codeHandlesReturn": True},
    {"presetValues": {}},
    {"script": "missing.py"},
    {"script": "doc.py", "presetValues": {"n": 2}},
    {"code": example("stream_rows.py"), "codeHandlesReturn": True, "presetValues": {"row_count": 3}},
]


async def _answers(server, command, tmp_path):
    (tmp_path / "serverConfig").mkdir(parents=True)
    (tmp_path / "serverConfig" / "server.config").write_text(
        f"targetServer={server.url}\nauthToken={TOKEN}\nsources={SOURCE}\n")
    proc = await asyncio.create_subprocess_exec(*command, cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        answers = []
        for query in QUERIES:
            result = await server.query(query, timeout=15)
            answers.append([(r["status"], r.get("body")) for r in result.replies])
        return answers
    finally:
        proc.terminate()
        await proc.wait()
        await server.drop(SOURCE)


def _shape(replies):
    """What must agree: statuses, messageCodes, and result values."""
    out = []
    for status, body in replies:
        if status >= 300:
            out.append((status, body["messageCode"]))
        elif isinstance(body, dict) and "pythonCallResults" in body:
            results = dict(body["pythonCallResults"])
            results.pop("working_directory", None)
            out.append((status, results))
        else:
            out.append((status, body))
    return out


@pytest.mark.skipif(not UPSTREAM.exists(), reason="upstream vantiqPythonExecConnector is not installed")
async def test_same_answers_as_upstream(server, tmp_path):
    server.put_document("doc.py", "doubled = n * 2")
    theirs = await _answers(server, [str(UPSTREAM)], tmp_path / "upstream")
    ours = await _answers(server, console_command(), tmp_path / "ours")
    assert [_shape(r) for r in ours] == [_shape(r) for r in theirs]

"""The code guard and the new WITH parameters, directly (pure)."""
import ast

import pytest

from pyexec_connector import errors
from pyexec_connector.engine.guard import CodeGuard
from pyexec_connector.errors import QueryError
from pyexec_connector.request import parse_query


def uses(code, *forbid):
    return [(v.line, v.use) for v in CodeGuard(forbid).violations(ast.parse(code))]


@pytest.mark.parametrize("code, forbid, found", [
    ("open('f')", ["open"], [(1, "open")]),
    ("x = 1\nf = open", ["open"], [(2, "open")]),
    ("import os\nos.system('ls')", ["os.system"], [(2, "os.system")]),
    ("import os as o\no.system('ls')", ["os.system"], [(2, "os.system")]),
    ("import os\nos.path.join('a')", ["os.system"], []),
    ("import os\nos.path.join('a')", ["os"], [(1, "import os"), (2, "os.path.join")]),
    ("import subprocess", ["subprocess"], [(1, "import subprocess")]),
    ("import subprocess as sp\nsp.run([])", ["subprocess"], [(1, "import subprocess"), (2, "subprocess.run")]),
    ("from subprocess import run", ["subprocess"], [(1, "import subprocess")]),
    ("from os import system as s", ["os.system"], [(1, "from os import system")]),
    ("import os.path", ["os.path"], [(1, "import os.path")]),
    ("x = {'open': 1}\ny = x['open']", ["open"], []),                    # strings are not uses
    ("def f(eval=1):\n    return eval", ["eval"], [(2, "eval")]),
    ("obj.open()", ["open"], []),                                           # a method named open is fine
    ("exec('1')\neval('2')\nexec('3')", ["exec", "eval"], [(1, "exec"), (2, "eval"), (3, "exec")]),
])
def test_guard_finds_uses_on_the_syntax_tree(code, forbid, found):
    assert uses(code, *forbid) == found


def test_guard_error_lists_every_use():
    guard = CodeGuard(["open", "eval"])
    with pytest.raises(QueryError) as info:
        guard.check(ast.parse("a = open('x')\nb = eval('1')"), "q.py")
    assert info.value.code == errors.GUARD_VIOLATION
    assert info.value.params[1] == "line 1: open; line 2: eval"
    assert not CodeGuard([]) and CodeGuard(["x"])


@pytest.mark.parametrize("params, name", [
    ({"code": "x=1", "timeout": "soon"}, "timeout"),
    ({"code": "x=1", "timeout": True}, "timeout"),
    ({"code": "x=1", "timeout": [1]}, "timeout"),
    ({"code": "x=1", "timeout": -1}, "timeout"),
    ({"code": "x=1", "timeout": float("inf")}, "timeout"),
    ({"code": "x=1", "captureOutput": "maybe"}, "captureOutput"),
    ({"code": "x=1", "dryRun": 5}, "dryRun"),
])
def test_new_parameters_of_the_wrong_type(params, name):
    with pytest.raises(QueryError) as info:
        parse_query(params)
    assert info.value.code == errors.BAD_PARAMETER and info.value.params[0] == name


def test_new_parameters_parsed():
    request = parse_query({"code": "x=1", "timeout": "2.5", "captureOutput": "yes", "dryRun": True})
    assert (request.timeout, request.capture_output, request.dry_run) == (2.5, True, True)
    request = parse_query({"code": "x=1"})
    assert (request.timeout, request.capture_output, request.dry_run) == (None, False, False)
    assert parse_query({"code": "x=1", "timeout": 0}).timeout == 0.0
    with pytest.raises(QueryError) as info:
        parse_query({"code": "x=1", "captureOutput": True, "codeHandlesReturn": True})
    assert info.value.code == errors.CONFLICTING_RETURN

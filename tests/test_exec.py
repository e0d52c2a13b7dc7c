"""`pyexec-connector exec` through the real console command, and `pyexec_connector.testing` for users'
own test suites: a script runs through a real connector source against the stand-in, as deployed."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pyexec_connector.testing import ScriptRunner, SourceConfigError, run_script, run_script_async

from .conftest import EXAMPLES, console_command

MODES = ("process", "inline")


def run_exec(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*console_command(), "exec", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def frames(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("mode", MODES)
def test_exec_runs_an_upstream_script_unchanged_and_prints_each_frame(mode, tmp_path):
    done = run_exec(str(EXAMPLES / "globals_result.py"), "--preset", "loop_count=3", "--mode", mode, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (reply,) = frames(done.stdout)
    assert reply["status"] == 200
    results = reply["body"]["pythonCallResults"]
    assert set(results) == {"loop_count", "items", "total", "i", "working_directory"}
    assert results["total"] == 3 and results["working_directory"] == str(tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_exec_streams_the_codes_own_replies_then_its_notification(mode, tmp_path):
    presets = tmp_path / "presets.json"
    presets.write_text(json.dumps({"row_count": 5}))
    done = run_exec(str(EXAMPLES / "stream_rows.py"), "--code-handles-return", "--presets", str(presets),
                    "--mode", mode)
    assert done.returncode == 0, done.stderr
    *replies, note = frames(done.stdout)
    assert [r["status"] for r in replies] == [100, 100, 100, 100, 200]
    assert [r["body"]["row"] for r in replies] == [0, 1, 2, 3, 4]
    assert note["notification"]["rows"] == 5


def test_exec_preset_wins_over_presets_file_and_quiet_prints_only_the_body(tmp_path):
    presets = tmp_path / "presets.json"
    presets.write_text(json.dumps({"a": 1, "b": 2}))
    done = run_exec("--code", "c = a + b", "--presets", str(presets), "--preset", "b=40", "--quiet",
                    "--limit-return-to", "c")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"pythonCallResults": {"c": 41}}


def test_exec_capture_output_and_timeout():
    done = run_exec("--code", "print('hello'); x = 1", "--capture-output", "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pythonOutput"]["stdout"] == "hello\n"
    done = run_exec("--code", "import time\ntime.sleep(30)", "--timeout", "0.5", "--quiet")
    assert done.returncode == 1 and done.stdout == ""
    assert "io.vantiq.pyexecsource.execution.timeout" in done.stderr


@pytest.mark.parametrize("mode", MODES)
def test_exec_error_exits_1_with_the_message_and_the_users_traceback_only(mode, tmp_path):
    script = tmp_path / "parse.py"
    script.write_text("import json\n\n\ndef parse(text):\n    return json.loads(text)\n\n\nvalue = parse(raw)\n")
    done = run_exec("parse.py", "--preset", 'raw="{"', "--mode", mode, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    (reply,) = frames(done.stdout)
    assert reply["status"] == 400
    assert reply["body"]["messageCode"] == "io.vantiq.pyexecsource.execution.exception"
    err = done.stderr
    assert err.startswith("error: io.vantiq.pyexecsource.execution.exception: Executing the code raised "
                          "JSONDecodeError: Expecting property name"), err
    assert 'File "parse.py", line 8, in <module>' in err and 'File "parse.py", line 5, in parse' in err
    assert "pyexec_connector" not in err                    # no connector frame in the traceback


def test_exec_syntax_error_exits_1_with_its_message():
    done = run_exec("--code", "x = (", "--quiet")
    assert done.returncode == 1 and done.stdout == ""
    assert "io.vantiq.pyexecsource.compile.syntaxerror" in done.stderr and "line 1" in done.stderr


@pytest.mark.parametrize("args, says", [
    ((), "give either FILE or --code"),
    (("x.py", "--code", "x = 1"), "give either FILE or --code"),
    (("--code", "x = 1", "--preset", "who=Vantiq"), "--preset who: 'Vantiq' is not JSON"),
    (("--code", "x = 1", "--preset", "=1"), "expected NAME=JSON"),
    (("--code", "x = 1", "--mode", "thread"), "invalid choice: 'thread'"),
    (("missing.py",), "FILE missing.py: cannot read it"),
    (("--code", "x = 1", "--presets", "missing.json"), "--presets missing.json: cannot read it"),
])
def test_exec_bad_arguments_exit_2_without_a_traceback(args, says, tmp_path):
    done = run_exec(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr and done.stdout == ""


def test_exec_source_configuration_file_is_checked_and_used(tmp_path):
    config = tmp_path / "source.json"
    config.write_text(json.dumps({"pythonExecConfig": {"general": {"workers": "many"}}}))
    done = run_exec("--code", "x = 1", "--source-config", str(config))
    assert done.returncode == 2 and "pythonExecConfig.general.workers" in done.stderr, done.stderr
    config.write_text(json.dumps({"pythonExecConfig": {"general": {"codeGuard": {"forbid": ["os.system"]}}}}))
    done = run_exec("--code", "import os\nos.system('true')", "--source-config", str(config), "--quiet")
    assert done.returncode == 1 and "io.vantiq.pyexecsource.codeguard.violation" in done.stderr, done.stderr


# ---- pyexec_connector.testing -------------------------------------------------------------------------

def test_run_script_returns_results_and_errors():
    reply = run_script(file=EXAMPLES / "globals_result.py", presets={"loop_count": 4})
    assert reply.status == 200 and reply.ok
    assert reply.results["total"] == 6 and "helper" not in reply.results
    failed = run_script("ratio = hits / misses", presets={"hits": 1, "misses": 0}, mode="inline")
    assert failed.status == 400 and failed.error_code == "io.vantiq.pyexecsource.execution.exception"
    assert failed.error_message == "Executing the code raised ZeroDivisionError: division by zero"
    assert failed.traceback.startswith("Traceback") and "pyexec_connector" not in failed.traceback
    with pytest.raises(AssertionError, match="ZeroDivisionError"):
        failed.results    # noqa: B018 - the property raises, naming the error


async def test_run_script_async_streamed_replies_and_notifications():
    reply = await run_script_async(file=EXAMPLES / "stream_rows.py", presets={"row_count": 3},
                                   code_handles_return=True)
    assert [r["status"] for r in reply.replies] == [100, 100, 200]
    assert [n["rows"] for n in reply.notifications] == [3]


async def test_script_runner_keeps_one_source_for_several_runs():
    """As on a deployed source: a worker's module state outlives a run, globals do not."""
    config = {"pythonExecConfig": {"general": {"workers": 1}}}
    async with ScriptRunner(source_config=config) as runner:
        code = ("import sys\nsys.runs = getattr(sys, 'runs', 0) + 1\nruns = sys.runs\n"
                "fresh = 'leftover' not in globals()\nleftover = 1")
        first = await runner.run(code)
        second = await runner.run(code)
    assert first.results["runs"] == 1 and second.results["runs"] == 2
    assert second.results["fresh"] is True


def test_script_runner_refuses_a_bad_source_configuration():
    with pytest.raises(SourceConfigError, match="executionMode"):
        ScriptRunner(source_config={"pythonExecConfig": {"general": {"executionMode": "thread"}}})
    with pytest.raises(SourceConfigError, match="pythonExecConfig"):
        ScriptRunner(source_config={"general": {"workers": 1}})

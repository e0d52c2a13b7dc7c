"""The real console command, as a user runs it."""
import asyncio
import os
import subprocess
import sys

import pytest

from .conftest import SOURCE, TOKEN, console_command


def test_help_documents_every_subcommand():
    done = subprocess.run(console_command() + ["--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for word in ("run", "demo", "--config", "--log-level", "Exit codes"):
        assert word in done.stdout
    demo = subprocess.run(console_command() + ["demo", "--help"], capture_output=True, text=True, timeout=60)
    assert "stand-in" in demo.stdout


def test_drop_in_command_name_exists():
    exe = os.path.join(os.path.dirname(sys.executable), "vantiqPythonExecConnector")
    if not os.path.exists(exe):
        pytest.skip("not installed as a console script in this environment")
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "pyexec-connector" in done.stdout


def test_demo_runs_a_full_round_trip(tmp_path):
    done = subprocess.run(console_command() + ["demo"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PATH": os.environ.get("PATH", "")})
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("VAIL> SELECT * FROM SOURCE pythonSource WITH") == 4
    assert '"greeting": "Hello, Vantiq!"' in out
    assert '"outliers": [30.0]' in out
    assert "reply 100:" in out and "notification on /sources/pythonSource" in out
    assert "io.vantiq.pyexecsource.execution.exception" in out
    assert "every query answered as expected" in out


async def _spawn(tmp_path, server, *args, token=TOKEN, extra=""):
    (tmp_path / "serverConfig").mkdir(exist_ok=True)
    (tmp_path / "serverConfig" / "server.config").write_text(
        f"targetServer = {server.url}\nauthToken = {token}\nsources = {SOURCE}\n{extra}")
    return await asyncio.create_subprocess_exec(
        *console_command(), *args, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)


async def test_console_command_serves_queries_and_never_logs_the_token(tmp_path, server):
    server.put_document("s.py", "doubled = n * 2")
    proc = await _spawn(tmp_path, server, "--log-level", "DEBUG")
    try:
        await server.wait_attached(SOURCE, timeout=30)
        assert (await server.query({"code": "x = n + 1", "presetValues": {"n": 1}})).results == {"n": 1, "x": 2}
        assert (await server.query({"script": "s.py", "presetValues": {"n": 4}})).results == {"n": 4, "doubled": 8}
        bad = await server.query({"code": "1/0"})
        assert bad.status == 400
        await server.drop(SOURCE)
        await server.wait_attached(SOURCE, timeout=30)
    finally:
        proc.terminate()
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = output.decode()
    assert proc.returncode == 0, text
    assert "DEBUG" in text and "connected and configured" in text
    assert TOKEN not in text
    assert TOKEN[:12] not in text       # not even a truncated frame


async def test_console_command_bad_token_exits_3(tmp_path, server):
    proc = await _spawn(tmp_path, server, token="not-the-token")
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 3
    assert "refused the access token" in output.decode()
    assert "not-the-token" not in output.decode()

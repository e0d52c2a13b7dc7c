"""The console command's smaller promises (issue 24, part 5): --log-level is checked by argparse, the event
loop variable follows the CONNECTOR_* convention, the version is the package's, healthcheck starts light."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest

from pyexec_connector import eventloop, sandbox

from .conftest import ROOT, SOURCE, TOKEN, console_command, free_port


@pytest.mark.parametrize("args", [["--log-level", "LOUD"], ["run", "--log-level", "verbose"],
                                  ["demo", "--log-level", "LOUD"]])
def test_an_unknown_log_level_is_a_usage_error(tmp_path, args):
    done = subprocess.run(console_command() + args, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "is not a log level" in done.stderr
    assert "DEBUG, INFO, WARNING, ERROR, CRITICAL" in done.stderr


def test_the_version_is_the_package_metadata_one():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" in project and "version" not in project.get("dynamic", [])
    done = subprocess.run(console_command() + ["--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"pyexec-connector {metadata.version('pyexec-connector')}"
    assert metadata.version("pyexec-connector") == project["version"]
    import pyexec_connector
    assert pyexec_connector.__version__ == project["version"]
    written = [p for p in (ROOT / "src").rglob("*.py") if re.search(r"__version__\s*=\s*['\"]", p.read_text())]
    assert written == []          # the version is written in pyproject.toml only


def test_the_event_loop_variable_and_its_old_name():
    assert eventloop.loop_choice({"CONNECTOR_EVENT_LOOP": "asyncio"}) == ("asyncio", None)
    choice, warning = eventloop.loop_choice({"PYEXEC_EVENT_LOOP": "asyncio"})
    assert choice == "asyncio" and "PYEXEC_EVENT_LOOP is deprecated" in warning and "CONNECTOR_EVENT_LOOP" in warning
    both = {"CONNECTOR_EVENT_LOOP": "uvloop", "PYEXEC_EVENT_LOOP": "asyncio"}
    assert eventloop.loop_choice(both) == ("uvloop", None)         # the new name wins, and nothing to warn of
    warned: list[str] = []
    assert eventloop.event_loop_factory(warned.append, {"PYEXEC_EVENT_LOOP": "asyncio"}) == (None, "asyncio")
    assert warned and "deprecated" in warned[0]
    assert eventloop.event_loop_factory(environ={"CONNECTOR_EVENT_LOOP": "asyncio"}) == (None, "asyncio")


def test_workers_see_the_event_loop_variable_and_no_other_connector_one():
    env = sandbox.worker_environment(None, {"CONNECTOR_EVENT_LOOP": "asyncio", "CONNECTOR_AUTH_TOKEN": TOKEN,
                                            "PATH": "/bin"})
    assert env == {"CONNECTOR_EVENT_LOOP": "asyncio", "PATH": "/bin"}


@pytest.mark.parametrize("variable, deprecated", [("CONNECTOR_EVENT_LOOP", False), ("PYEXEC_EVENT_LOOP", True)])
async def test_the_connector_runs_on_the_loop_asked_for(server, tmp_path, variable, deprecated):
    (tmp_path / "server.config").write_text(f"targetServer = {server.url}\nauthToken = {TOKEN}\nsources = {SOURCE}\n")
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("CONNECTOR_EVENT_LOOP", "PYEXEC_EVENT_LOOP")}
    proc = await asyncio.create_subprocess_exec(*console_command(), cwd=tmp_path, env={**env, variable: "asyncio"},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        # user code runs in a worker process: the variable reaches it (uvloop would say "uvloop")
        reply = await server.query({"code": "import asyncio\nloop = type(asyncio.get_running_loop()).__module__"})
        assert reply.results == {"loop": "asyncio.unix_events"}, reply
    finally:
        proc.terminate()
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = output.decode()
    assert proc.returncode == 0, text
    assert "event loop: asyncio" in text
    assert ("PYEXEC_EVENT_LOOP is deprecated" in text) is deprecated, text


HEAVY = ("websockets", "aiohttp", "pydantic", "pydantic_core", "asyncio", "prometheus_client", "orjson")


@pytest.mark.parametrize("port", [None, "free"])
def test_healthcheck_imports_only_what_it_needs(tmp_path, port):
    config = tmp_path / "server.config"
    config.write_text("targetServer = https://dev.vantiq.com\nauthToken = abc\nsources = s\n"
                      + (f"metricsPort = {free_port()}\n" if port else ""))
    probe = ("import sys\nfrom pyexec_connector.cli import main\n"
             f"code = main(['healthcheck', '--config', {str(config)!r}])\n"
             "print('modules', ' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
             "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == (1 if port else 0), done.stdout + done.stderr
    modules = set(done.stdout.split("modules", 1)[1].split())
    assert not modules & set(HEAVY), modules & set(HEAVY)


def test_the_worker_setting_names_the_event_loop_variable():
    """sandbox.py spells the variable out (an environment's zygote loads it before site-packages, with no
    package around it); the two names must stay one."""
    from pyexec_connector import eventloop, sandbox
    assert sandbox.WORKER_SETTINGS == {eventloop.LOOP_ENV}

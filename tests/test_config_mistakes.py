"""Mistakes a user makes in a configuration, and what the connector says of them (issue 24): a typo'd key
names the key it likely meant, in `run` and `check`; a placeholder is an error naming its key."""
from __future__ import annotations

import logging
import secrets
import subprocess
from pathlib import Path

import pytest

from pyexec_connector.config import (
    config_problems,
    config_warnings,
    parse_source_config,
    source_config_problems,
)

from .conftest import SOURCE, TOKEN, console_command

BASE = {"targetServer": "https://dev.vantiq.com", "authToken": "abc", "sources": "one"}


@pytest.mark.parametrize("typo, meant", [
    ("sendPing", "sendPings"), ("metricPort", "metricsPort"), ("authtoken", "authToken"),
    ("maxPendingByte", "maxPendingBytes"), ("workeruser", "workerUser"), ("target_server", "targetServer"),
])
def test_an_unknown_server_key_names_the_closest_known_one(typo, meant):
    warnings = config_warnings({**BASE, typo: "1"}, env={}, file="s.config")
    assert warnings == [f"s.config: unknown key `{typo}`: did you mean `{meant}`?"]


def test_a_key_like_no_other_is_still_named_and_known_keys_are_not():
    assert config_warnings(BASE, env={}) == []
    (line,) = config_warnings({**BASE, "myApplicationSetting": "x"}, env={})
    assert "`myApplicationSetting`" in line and "did you mean" not in line


def test_an_unknown_connector_variable_is_named_too():
    warnings = config_warnings(BASE, env={"CONNECTOR_SEND_PING": "true", "CONNECTOR_EVENT_LOOP": "asyncio",
                                          "CONNECTOR_METRICS_PORT": "9100", "OTHER": "x"})
    assert warnings == ["unknown environment variable CONNECTOR_SEND_PING: did you mean CONNECTOR_SEND_PINGS?"]


def test_an_unknown_source_key_names_the_closest_known_one(caplog):
    document = {"pythonExecConfig": {"general": {"worker": 2, "codeGuard": {"forbidden": ["os"]}}}}
    config, errors, warnings = source_config_problems(document)
    assert config is not None and errors == []
    assert config.workers is None and config.codeGuard is not None and config.codeGuard.forbid == ()
    assert warnings == ["unknown key `pythonExecConfig.general.worker`: did you mean `workers`?",
                        "unknown key `pythonExecConfig.general.codeGuard.forbidden`: did you mean `forbid`?"]
    with caplog.at_level(logging.WARNING):
        parse_source_config(document, "src")
    assert "source src: unknown key `pythonExecConfig.general.worker`: did you mean `workers`?" in caplog.text


@pytest.mark.parametrize("token", ["<your access token>", "<token>", "changeme", "CHANGE_ME", "your-token",
                                   "YOUR_ACCESS_TOKEN", "${VANTIQ_TOKEN}", "$TOKEN", "xxxxxxxx", "...",
                                   "your access token here", "TODO"])
def test_a_placeholder_token_is_an_error_naming_the_key(token):
    config, problems = config_problems({**BASE, "authToken": token}, env={}, file="s.config")
    assert config is None and [p.key for p in problems] == ["authToken"]
    assert "placeholder" in str(problems[0]) and token.strip() not in str(problems[0])   # a token is never shown


def test_placeholders_elsewhere_and_from_the_environment():
    _, problems = config_problems({"targetServer": "https://<your vantiq server>", "sources": "<source name>"},
                                  env={"CONNECTOR_AUTH_TOKEN": "<your access token>"}, file="s.config")
    assert [(p.key, p.file) for p in problems] == [
        ("targetServer", "s.config"), ("authToken", "environment variable CONNECTOR_AUTH_TOKEN"),
        ("sources", "s.config")]
    assert all("placeholder" in str(p) for p in problems)


def test_the_environment_stands_in_for_a_placeholder_in_the_file():
    """The example copied as it is and the token given as CONNECTOR_AUTH_TOKEN (docker run -e ...)."""
    properties = {**BASE, "authToken": "<your access token>"}
    config, problems = config_problems(properties, env={"CONNECTOR_AUTH_TOKEN": "from-env-123"}, file="s.config")
    assert problems == [] and config is not None and config.auth_token == "from-env-123"
    assert "authToken" not in config.public_properties
    config, _ = config_problems({**BASE, "authToken": "in-file-123"}, env={"CONNECTOR_AUTH_TOKEN": "from-env-123"})
    assert config is not None and config.auth_token == "in-file-123"          # a real value in the file wins


def test_real_tokens_are_not_taken_for_placeholders():
    for _ in range(2000):
        token = secrets.token_urlsafe(32)
        assert config_problems({**BASE, "authToken": token}, env={})[1] == [], token
    for token in ("abc", "t" * 20, "not-the-token", "token-1234", "Kd8sPq3Zr0x=="):
        assert config_problems({**BASE, "authToken": token}, env={})[1] == [], token


TYPO = ("targetServer = http://127.0.0.1:9\nauthToken = abc\nsources = s\nsendPing = true\n"
        "failOnConnectionError = true\n")


def _console(tmp_path, *args: str, config: str) -> subprocess.CompletedProcess:
    (tmp_path / "server.config").write_text(config)
    return subprocess.run(console_command() + list(args), cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", ["run", "check"])
def test_run_and_check_say_what_a_typo_meant(tmp_path, command):
    done = _console(tmp_path, command, "--config", "server.config", config=TYPO)
    output = done.stdout + done.stderr
    assert "server.config: unknown key `sendPing`: did you mean `sendPings`?" in output, output
    assert "Traceback" not in output


def test_a_typo_is_named_beside_the_error_it_causes(tmp_path):
    """`authtoken` for `authToken`: the missing key, and the line that says why."""
    done = _console(tmp_path, config="targetServer = http://127.0.0.1:9\nauthtoken = abc\nsources = s\n")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert "configuration warning: server.config: unknown key `authtoken`: did you mean `authToken`?" in lines[0]
    assert "key 'authToken': is required" in lines[1] and len(lines) == 2


def test_the_copied_example_is_refused_until_it_has_a_token(tmp_path):
    from .conftest import ROOT
    done = _console(tmp_path, config=(ROOT / "serverConfig" / "server.config.example").read_text())
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "key 'authToken': is a placeholder" in done.stderr and "<your access token>" not in done.stderr


async def test_check_names_what_an_unknown_source_key_meant(server, tmp_path):
    server.set_source_config(SOURCE, {"preloads": ["json"]})
    (tmp_path / "server.config").write_text(f"targetServer = {server.url}\nauthToken = {TOKEN}\nsources = {SOURCE}\n")
    import asyncio
    proc = await asyncio.create_subprocess_exec(*console_command(), "check", cwd=tmp_path,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = output.decode()
    assert proc.returncode == 0, text
    assert "unknown key `pythonExecConfig.general.preloads`: did you mean `preload`?" in text


@pytest.mark.parametrize("changes, line", [
    ({"tcpProbePort": "70000"}, "s.config: key 'tcpProbePort': must be at most 65535, not '70000'"),
    ({"maxMessageBytes": "lots"}, "s.config: key 'maxMessageBytes': must be a whole number, not 'lots'"),
    ({"documentTimeout": "nan"}, "s.config: key 'documentTimeout': must be a finite number, not 'nan'"),
    ({"sendPings": "maybe"}, "s.config: key 'sendPings': must be true or false, not 'maybe'"),
    ({"connectKWArgs": '{"open_timeout": "soon"}'},
     "s.config: key 'connectKWArgs.open_timeout': must be a number, not 'soon'"),
    ({"connectKWArgs": '{"max_queue": "x"}'},
     "s.config: key 'connectKWArgs.max_queue': must be a number or a pair [high, low], not 'x'"),
    ({"connectKWArgs": '{"write_limit": -5}'}, "s.config: key 'connectKWArgs.write_limit': must be at least 0, not -5"),
    ({"connectKWArgs": '{"extra_headers": {"X-A": 1}}'},
     "s.config: key 'connectKWArgs.extra_headers': ['X-A'] must be text, not 1"),
    ({"connectKWArgs": '{"open_timout": 5}'}, "s.config: key 'connectKWArgs.open_timout': is not an option of the "
                                              "connector's websocket: did you mean `open_timeout`?"),
    ({"connectKWArgs": '{"caFile": "/no/such/ca.pem"}'},
     "s.config: key 'connectKWArgs.caFile': names no file: '/no/such/ca.pem'"),
])
def test_messages_read_plainly_after_the_key(changes, line):
    """pydantic's own words ("Input should be less than or equal to 65535") are not what a user reads."""
    _, problems = config_problems({**BASE, **changes}, env={}, file="s.config")
    assert [str(p) for p in problems] == [line]


@pytest.mark.parametrize("general, line", [
    ({"codeCacheSize": 0}, "pythonExecConfig.general.codeCacheSize: must be at least 1, not 0"),
    ({"executionMode": "thread"},
     "pythonExecConfig.general.executionMode: must be 'process' or 'inline', not 'thread'"),
    ({"workers": 2, "minWorkers": 3}, "pythonExecConfig.general.minWorkers: must not exceed workers (2), the most "
                                      "that may run"),
    ({"codeGuard": {"forbid": "os"}},
     "pythonExecConfig.general.codeGuard.forbid: must be a list of strings, such as [\"os\"], not 'os'"),
    ({"preload": [3]}, "pythonExecConfig.general.preload: 3 is not a module name (such as \"pandas\" or "
                       "\"mypackage.models\")"),
])
def test_source_messages_read_plainly_after_the_key(general, line):
    config, errors, _ = source_config_problems({"pythonExecConfig": {"general": general}})
    assert config is None and errors == [line]


@pytest.mark.parametrize("in_file, warned", [("<your access token>", False), (TOKEN, True)])
async def test_a_placeholder_in_a_readable_file_is_no_token_exposed(server, in_file, warned):
    """The file keeps the example's placeholder, the token comes from the environment: nothing to warn of."""
    import asyncio
    import os
    import shutil
    import tempfile
    open_dir = tempfile.mkdtemp(prefix="pyexec-open-", dir="/tmp")      # every user may reach it
    try:
        os.chmod(open_dir, 0o755)
        config = Path(open_dir) / "server.config"
        config.write_text(f"targetServer = {server.url}\nauthToken = {in_file}\nsources = {SOURCE}\n")
        config.chmod(0o644)
        env = {"PATH": os.environ.get("PATH", ""), "CONNECTOR_AUTH_TOKEN": TOKEN}
        proc = await asyncio.create_subprocess_exec(*console_command(), "check", cwd=open_dir, env=env,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        shutil.rmtree(open_dir)
    text = output.decode()
    assert proc.returncode == 0, text
    assert ("holds authToken and is readable" in text) is warned, text

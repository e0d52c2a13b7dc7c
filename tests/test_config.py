import subprocess
import sys

import pydantic
import pytest

from pyexec_connector.config import (
    ServerConfig,
    SourceConfig,
    build_server_config,
    load_server_config,
    parse_source_config,
    read_properties,
    websocket_options,
)
from pyexec_connector.errors import ConfigError

from .conftest import console_command

BASE = {"targetServer": "https://dev.vantiq.com", "authToken": "abc", "sources": "one"}


def props(**changes):
    values = dict(BASE)
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def test_java_properties_syntax(tmp_path):
    path = tmp_path / "server.config"
    path.write_text(
        "# a comment\n! another\n"
        "targetServer: https://dev.vantiq.com\n"
        "authToken=abc\\\n  def\n"
        "sources = one,\\\n   two , three\n"
        "sendPings = TRUE\n"
        "failOnConnectionError yes\n"
        "tcpProbePort=9001\n"
        'connectKWArgs = {"disableSslVerification": true, "open_timeout": 5}\n'
        "reconnectSecret = fixed\n")
    config = load_server_config(path, env={})
    assert config.auth_token == "abcdef"
    assert config.sources == ("one", "two", "three")
    assert config.send_pings is True and config.fail_on_connection_error is True
    assert config.tcp_probe_port == 9001
    assert config.verify_tls is False
    assert websocket_options(config) == {"open_timeout": 5}
    assert config.reconnect_secret == "fixed"
    assert "authToken" not in config.public_properties
    assert config.public_properties["sources"].startswith("one")


def test_defaults():
    config = build_server_config(props(), env={})
    assert (config.send_pings, config.fail_on_connection_error, config.tcp_probe_port) == (False, False, 8000)
    assert websocket_options(config) == {} and config.verify_tls and config.reconnect_secret is None
    assert config.max_message_bytes >= 64 * 1024 * 1024


@pytest.mark.parametrize("target, ws, rest", [
    ("https://dev.vantiq.com", "wss://dev.vantiq.com/api/v1/wsock/websocket", "https://dev.vantiq.com"),
    ("http://localhost:8080/", "ws://localhost:8080/api/v1/wsock/websocket", "http://localhost:8080"),
    ("https://h.example/some/path", "wss://h.example/api/v1/wsock/websocket", "https://h.example"),
    ("https://h.example/api/v2/wsock/websocket", "wss://h.example/api/v2/wsock/websocket", "https://h.example"),
    ("wss://h.example", "wss://h.example/api/v1/wsock/websocket", "https://h.example"),
])
def test_url_normalisation(target, ws, rest):
    config = build_server_config(props(targetServer=target), env={})
    assert config.websocket_url == ws
    assert config.rest_base == rest


def test_token_from_environment():
    config = build_server_config(props(authToken=None), env={"CONNECTOR_AUTH_TOKEN": "from-env"})
    assert config.auth_token == "from-env"


@pytest.mark.parametrize("changes, key", [
    ({"sources": " , "}, "sources"),
    ({"sources": None}, "sources"),
    ({"sources": 5}, "sources"),                 # built in code rather than read from a file
    ({"authToken": None}, "authToken"),
    ({"targetServer": "not a url"}, "targetServer"),
    ({"targetServer": "ftp://x.example"}, "targetServer"),
    ({"targetServer": "https://x.example:notaport"}, "targetServer"),
    ({"sendPings": "maybe"}, "sendPings"),
    ({"tcpProbePort": "70000"}, "tcpProbePort"),
    ({"connectKWArgs": "{not json"}, "connectKWArgs"),
    ({"connectKWArgs": "[1]"}, "connectKWArgs"),
    ({"connectKWArgs": '{"bogus": 1}'}, "connectKWArgs.bogus"),
    ({"connectKWArgs": '{"open_timeout": "soon"}'}, "connectKWArgs.open_timeout"),
    ({"connectKWArgs": '{"open_timeout": -1}'}, "connectKWArgs.open_timeout"),
    ({"connectKWArgs": '{"ping_interval": [1]}'}, "connectKWArgs.ping_interval"),
    ({"connectKWArgs": '{"max_size": "big"}'}, "connectKWArgs.max_size"),
    ({"connectKWArgs": '{"max_queue": "x"}'}, "connectKWArgs.max_queue"),
    ({"connectKWArgs": '{"write_limit": -5}'}, "connectKWArgs.write_limit"),
    ({"connectKWArgs": '{"compression": "gzip"}'}, "connectKWArgs.compression"),
    ({"connectKWArgs": '{"additional_headers": ["x"]}'}, "connectKWArgs.additional_headers"),
    ({"connectKWArgs": '{"extra_headers": {"a": 1}}'}, "connectKWArgs.extra_headers"),
    ({"connectKWArgs": '{"user_agent_header": 3}'}, "connectKWArgs.user_agent_header"),
    ({"connectKWArgs": '{"proxy": 5}'}, "connectKWArgs.proxy"),
    ({"connectKWArgs": '{"disableSslVerification": "maybe"}'}, "connectKWArgs.disableSslVerification"),
    ({"connectKWArgs": '{"caFile": "/no/such/ca.pem"}'}, "connectKWArgs.caFile"),
    ({"connectKWArgs": '{"logger": "x"}'}, "connectKWArgs.logger"),      # the connector's own
    ({"connectKWArgs": '{"ssl": false}'}, "connectKWArgs.ssl"),
])
def test_bad_config_names_the_key(changes, key):
    with pytest.raises(ConfigError) as info:
        build_server_config(props(**changes), env={}, file="x/server.config")
    assert info.value.key == key
    assert "x/server.config" in str(info.value) and key in str(info.value)


def test_connect_options_are_typed_and_checked_against_websockets():
    config = build_server_config(props(connectKWArgs='{"open_timeout": "7.5", "extra_headers": {"X-A": "b"}, '
                                                     '"local_addr": ["127.0.0.1", 0], "compression": "deflate", '
                                                     '"disableSslVerification": "yes"}'), env={})
    assert websocket_options(config) == {"open_timeout": 7.5, "additional_headers": {"X-A": "b"},
                                         "local_addr": ["127.0.0.1", 0], "compression": "deflate"}
    assert config.verify_tls is False


def test_config_is_frozen():
    config = build_server_config(props(), env={})
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.sources = ("other",)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        SourceConfig().workers = 3
    assert isinstance(config, ServerConfig)


@pytest.mark.parametrize("content, needle", [
    (None, "no server.config found"),
    ("targetServer=https://dev.vantiq.com\nauthToken=abc\nsources=\n", "key 'sources'"),
    ("targetServer=https://dev.vantiq.com\nsources=a\n", "key 'authToken'"),
    ("targetServer=https//broken\nauthToken=abc\nsources=a\n", "key 'targetServer'"),
])
def test_console_command_refuses_bad_config(tmp_path, content, needle):
    if content is not None:
        (tmp_path / "serverConfig").mkdir()
        (tmp_path / "serverConfig" / "server.config").write_text(content)
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run(console_command(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert needle in lines[0]
    if content is not None:
        assert "serverConfig/server.config" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_source_config_defaults_and_values(caplog):
    assert parse_source_config(None) == SourceConfig()
    assert parse_source_config({}) == SourceConfig()
    config = parse_source_config({"pythonExecConfig": {"general": {"codeCacheSize": 7,
                                                                   "returnRuntimeInformation": True}}})
    assert (config.codeCacheSize, config.returnRuntimeInformation) == (7, True)


def test_source_config_unknown_key_warns(caplog):
    config = parse_source_config({"pythonExecConfig": {"general": {"codeCacheSize": 3, "bogus": 1}}}, "src")
    assert config.codeCacheSize == 3
    assert any("pythonExecConfig.general.bogus" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


@pytest.mark.parametrize("document", [
    {"pythonExecConfig": {"general": {"codeCacheSize": "lots"}}},
    {"pythonExecConfig": {"general": {"codeCacheSize": 0}}},
    {"pythonExecConfig": {"general": [1, 2]}},
    {"pythonExecConfig": "nonsense"},
])
def test_source_config_wrong_types_keep_defaults(caplog, document):
    assert parse_source_config(document, "src") == SourceConfig()
    assert any(r.levelname == "ERROR" and "src" in r.getMessage() for r in caplog.records)


THREE_PROBLEMS = "targetServer=https://dev.vantiq.com\nsources=\nsendPings = maybe\n"


@pytest.mark.parametrize("command", [[], ["run"], ["check"]])
def test_every_problem_of_a_file_at_once(tmp_path, command):
    """No token, an empty sources and sendPings = maybe: all three in one go, from `run` and `check`."""
    (tmp_path / "serverConfig").mkdir()
    (tmp_path / "serverConfig" / "server.config").write_text(THREE_PROBLEMS)
    done = subprocess.run(console_command() + command, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 3, lines
    for line, key in zip(lines, ("authToken", "sources", "sendPings"), strict=True):
        assert f"serverConfig/server.config: key '{key}'" in line
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize("kwargs, key", [
    ('{"open_timeout": "soon"}', "connectKWArgs.open_timeout"),
    ('{"disableSslVerification": "maybe"}', "connectKWArgs.disableSslVerification"),
    ('{"max_size": -1}', "connectKWArgs.max_size"),
    ('{"no_such_option": 1}', "connectKWArgs.no_such_option"),
])
@pytest.mark.parametrize("origin", ["file", "environment"])
def test_bad_connect_kwargs_exit_2_at_start(tmp_path, kwargs, key, origin):
    """Once a retry loop ("unexpected error on the connection; reconnecting") or a traceback."""
    config = "targetServer=https://127.0.0.1:9\nauthToken=abc\nsources=s\nfailOnConnectionError=true\n"
    env = {"PATH": "/usr/bin:/bin"}
    if origin == "file":
        config += f"connectKWArgs = {kwargs}\n"
    else:
        env["CONNECTOR_CONNECT_KW_ARGS"] = kwargs
    (tmp_path / "server.config").write_text(config)
    done = subprocess.run(console_command(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"key '{key}'" in lines[0], done.stderr
    assert ("server.config" if origin == "file" else "environment variable CONNECTOR_CONNECT_KW_ARGS") in lines[0]
    assert "Traceback" not in done.stdout + done.stderr and "reconnecting" not in done.stdout


@pytest.mark.parametrize("content, said", [
    ("targetServer=https://dev.vantiq.com\nauthToken=abc\nsources=s\nmetricsPort = lots\n", "key 'metricsPort'"),
    (None, "no server.config found"),
])
def test_healthcheck_exits_only_0_or_1(tmp_path, content, said):
    """Docker reserves exit code 2 of a HEALTHCHECK: a configuration error is "unhealthy" (1)."""
    if content is not None:
        (tmp_path / "server.config").write_text(content)
    done = subprocess.run(console_command() + ["healthcheck"], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "configuration error" in done.stdout and said in done.stdout


def test_properties_are_read_as_upstream_reads_them(tmp_path):
    """Escapes and separators as Java's Properties.load; a malformed \\u escape is kept as its letters, as
    upstream's reader (the same one) keeps it, rather than refusing a file upstream starts with."""
    path = tmp_path / "server.config"
    path.write_text("a=\\u00e9t\\u00e9\nb = x\\ty\nc\\:d = 1\n  e   =   spaced\nf\nbad=\\uZZZZ\ndup=1\ndup=2\n",
                    encoding="utf-8")
    assert read_properties(path) == {"a": "été", "b": "x\ty", "c:d": "1", "e": "spaced", "f": "", "bad": "uZZZZ",
                                     "dup": "2"}


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {name.split(".")[0] for name in done.stdout.split()}


def test_the_configuration_is_read_with_pydantic_and_workers_do_not_import_it():
    """Issue 24: the configuration models are pydantic's (the memory they cost is in docs/PERFORMANCE.md);
    a worker process, forked by the hundred, imports neither them nor javaproperties' XML stack."""
    assert "pydantic" in _modules_after("import pyexec_connector.cli, pyexec_connector.connector")
    assert issubclass(ServerConfig, pydantic.BaseModel) and issubclass(SourceConfig, pydantic.BaseModel)
    assert "xml" not in _modules_after("import pyexec_connector.cli, pyexec_connector.connector")
    worker = _modules_after("import pyexec_connector.engine.worker, pyexec_connector.engine.zygote")
    assert not worker & {"pydantic", "pydantic_core", "xml", "websockets", "aiohttp"}, worker


def test_the_dependency_on_pydantic_is_a_runtime_one():
    from importlib import metadata
    core = [r for r in metadata.requires("pyexec-connector") or [] if "extra ==" not in r]
    assert any(r.startswith("pydantic") and "<3" in r for r in core), core

"""server.config keys from CONNECTOR_* environment variables."""
from __future__ import annotations

import pytest

from pyexec_connector.config import (
    ENV_FOR_KEY,
    ServerConfig,
    build_server_config,
    config_problems,
    env_name,
    load_server_config,
    websocket_options,
)
from pyexec_connector.errors import ConfigError

REQUIRED = {"CONNECTOR_TARGET_SERVER": "https://dev.vantiq.com", "CONNECTOR_AUTH_TOKEN": "env-token",
            "CONNECTOR_SOURCES": "a, b"}


@pytest.mark.parametrize(("key", "variable"), [
    ("targetServer", "CONNECTOR_TARGET_SERVER"), ("authToken", "CONNECTOR_AUTH_TOKEN"),
    ("sources", "CONNECTOR_SOURCES"), ("sendPings", "CONNECTOR_SEND_PINGS"),
    ("failOnConnectionError", "CONNECTOR_FAIL_ON_CONNECTION_ERROR"), ("tcpProbePort", "CONNECTOR_TCP_PROBE_PORT"),
    ("connectKWArgs", "CONNECTOR_CONNECT_KW_ARGS"), ("reconnectSecret", "CONNECTOR_RECONNECT_SECRET"),
    ("metricsPort", "CONNECTOR_METRICS_PORT"), ("shutdownGraceSeconds", "CONNECTOR_SHUTDOWN_GRACE_SECONDS"),
])
def test_variable_names(key, variable):
    assert env_name(key) == variable
    assert ENV_FOR_KEY[key] == variable


def test_every_key_has_a_variable():
    assert set(ENV_FOR_KEY) == set(ServerConfig.keys())
    assert {"targetServer", "authToken", "connectKWArgs", "workerUser"} <= set(ENV_FOR_KEY)


def test_environment_fills_only_what_the_file_lacks():
    config = build_server_config({"targetServer": "https://file.example.com", "sources": "fromFile"},
                                 env={**REQUIRED, "CONNECTOR_SEND_PINGS": "yes", "CONNECTOR_METRICS_PORT": "9100"})
    assert config.target_server == "https://file.example.com"       # the file wins
    assert config.sources == ("fromFile",)
    assert config.auth_token == "env-token"
    assert config.send_pings is True and config.metrics_port == 9100
    assert "authToken" not in config.public_properties            # user code never sees the token
    assert config.public_properties["sendPings"] == "yes"


def test_no_file_at_all(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_server_config(env={**REQUIRED, "CONNECTOR_CONNECT_KW_ARGS": '{"open_timeout": 5}'})
    assert config.sources == ("a", "b") and websocket_options(config) == {"open_timeout": 5}


def test_no_file_and_not_enough_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_server_config(env={"CONNECTOR_TARGET_SERVER": "https://dev.vantiq.com"})
    assert "no server.config" in str(info.value)
    assert "CONNECTOR_AUTH_TOKEN" in str(info.value) and "CONNECTOR_SOURCES" in str(info.value)


def test_errors_say_the_value_came_from_the_environment():
    with pytest.raises(ConfigError) as info:
        build_server_config({}, env={**REQUIRED, "CONNECTOR_TCP_PROBE_PORT": "70000"}, file=None)
    assert info.value.key == "tcpProbePort"
    assert "environment variable CONNECTOR_TCP_PROBE_PORT" in str(info.value)
    with pytest.raises(ConfigError) as info:
        build_server_config({"tcpProbePort": "70000"}, env=REQUIRED, file="serverConfig/server.config")
    assert str(info.value).startswith("serverConfig/server.config: key 'tcpProbePort'")


def test_every_problem_is_collected():
    config, problems = config_problems({"targetServer": "nope", "authToken": "t", "sources": "a",
                                        "sendPings": "sometimes", "metricsPort": "0"}, env={})
    assert config is None
    assert {p.key for p in problems} == {"targetServer", "sendPings", "metricsPort"}


def test_every_problem_is_collected_even_with_required_keys_missing():
    config, problems = config_problems({"targetServer": "https://dev.vantiq.com", "sources": " ",
                                        "sendPings": "maybe", "connectKWArgs": '{"open_timeout": "soon"}'},
                                       env={"CONNECTOR_TCP_PROBE_PORT": "-1"}, file="s.config")
    assert config is None
    assert [(p.key, p.file) for p in problems] == [
        ("authToken", "s.config"), ("sources", "s.config"), ("sendPings", "s.config"),
        ("tcpProbePort", "environment variable CONNECTOR_TCP_PROBE_PORT"),
        ("connectKWArgs.open_timeout", "s.config")]
    assert "CONNECTOR_AUTH_TOKEN" in str(problems[0])

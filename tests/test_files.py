"""The files a user of the upstream connector expects to find."""
import json
from pathlib import Path

from pyexec_connector.config import load_server_config

from .conftest import EXAMPLES, ROOT


def test_source_type_definition():
    impl = json.loads((ROOT / "resources" / "pythonExecImpl.json").read_text())
    assert impl == {"name": "PYTHONEXECUTION", "baseType": "EXTENSION", "verticle": "service:extensionSource",
                    "config": {}, "baseConfigProperties": [], "operations": ["notification", "query"]}


def test_example_server_config_parses(tmp_path):
    """Once its placeholder token is replaced (as it is, the connector refuses it: test_config_reference.py)."""
    copy = tmp_path / "server.config"
    copy.write_text((ROOT / "serverConfig" / "server.config.example").read_text()
                    .replace("<your access token>", "a-real-token-123"))
    config = load_server_config(copy, env={})
    assert config.sources and config.websocket_url.startswith("wss://")


def test_example_copies_match_shared():
    shared = ROOT.parent / "shared" / "examples"
    local = ROOT / "tests" / "examples"
    if shared.is_dir():
        for path in shared.glob("*.py"):
            assert (local / path.name).read_text() == path.read_text()
    assert EXAMPLES.is_dir() and (EXAMPLES / "stream_rows.py").is_file()


def test_logger_ini_files_are_valid(tmp_path):
    import logging.config
    for path in (ROOT / "logger.ini", ROOT / "serverConfig" / "logger.ini"):
        logging.config.fileConfig(Path(path), disable_existing_loggers=False)

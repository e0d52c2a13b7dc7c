"""docs/CONFIGURATION.md and serverConfig/server.config.example are generated from the configuration models
(issue 24): they must say what the code says."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

from pyexec_connector.config import (
    ENV_FOR_KEY,
    ServerConfig,
    SourceConfig,
    config_problems,
    read_properties,
)
from pyexec_connector.config.reference import EXAMPLE, PAGE, outputs, render_example, render_page
from pyexec_connector.config.server import OTHER_VARIABLES

from .conftest import ROOT

REFERENCE = [sys.executable, "-m", "pyexec_connector.config.reference"]


def test_the_page_and_the_example_are_what_the_code_says():
    """Fails when a key is added or changed without `python -m pyexec_connector.config.reference --write`."""
    assert (ROOT / PAGE).read_text(encoding="utf-8") == render_page()
    assert (ROOT / EXAMPLE).read_text(encoding="utf-8") == render_example()
    done = subprocess.run(REFERENCE + ["--check", "--root", str(ROOT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_check_names_a_file_out_of_date(tmp_path):
    for path, text in outputs().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text, encoding="utf-8")
    page = tmp_path / PAGE
    page.write_text(page.read_text().replace("`maxPendingBytes`", "`maxPendingByte`"))
    done = subprocess.run(REFERENCE + ["--check", "--root", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "docs/CONFIGURATION.md" in done.stderr and "--write" in done.stderr
    done = subprocess.run(REFERENCE + ["--write", "--root", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and page.read_text() == render_page()


def _rows(page: str, heading: str) -> dict[str, list[str]]:
    """{key: its row's cells} of the first table under `heading`."""
    section = page.split(heading, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def test_every_key_is_on_the_page_with_type_default_variable_and_meaning():
    page = render_page()
    server = _rows(page, "## server.config")
    assert list(server) == ServerConfig.keys()
    for key, (_, kind, default, variable, meaning) in server.items():
        assert kind and default and meaning, key
        assert variable == f"`{ENV_FOR_KEY[key]}`"
    assert server["tcpProbePort"][1:3] == ["whole number, 0–65535", "8000"]
    assert server["targetServer"][2] == "required"
    assert server["maxPendingBytes"][2] == "16777216 (16 MiB)"
    source = _rows(page, "## A source's configuration")
    assert list(source) == SourceConfig.keys()
    assert source["executionMode"][1:3] == ["`process` or `inline`", "`process`"]
    assert all(kind and default and meaning for _, kind, default, meaning in source.values())
    assert "open_timeout" in _rows(page, "### connectKWArgs")
    assert set(_rows(page, "## Other environment variables")) == set(OTHER_VARIABLES)


def test_the_example_holds_every_key_and_every_variable():
    example = (ROOT / EXAMPLE).read_text()
    for key in ServerConfig.keys():
        assert re.search(rf"^#?{key} = ", example, re.MULTILINE), key
    for variable in [*ENV_FOR_KEY.values(), *OTHER_VARIABLES]:
        assert variable in example, variable
    for needed in ("maxPendingBytes", "workerUser", "workerGroup", "CONNECTOR_MAX_DOCUMENT_BYTES",
                   "CONNECTOR_DOCUMENT_TIMEOUT"):
        assert needed in example


def test_the_example_as_copied_asks_only_for_a_token(tmp_path):
    """Every value in it is valid, but the token: a user who copies it without setting one is told so."""
    copy = tmp_path / "server.config"
    shutil.copy(ROOT / EXAMPLE, copy)
    properties = read_properties(copy)
    config, problems = config_problems(properties, env={}, file=str(copy))
    assert config is None and [p.key for p in problems] == ["authToken"] and "placeholder" in str(problems[0])
    # every commented key, uncommented, is valid too (workerUser needs a root connector: left out)
    text = re.sub(r"^#(\w+ = )", r"\1", copy.read_text(), flags=re.MULTILINE)
    copy.write_text(text.replace("<your access token>", "a-real-token-123"))
    properties = read_properties(copy)
    assert set(ServerConfig.keys()) <= set(properties)
    for key in ("workerUser", "workerGroup"):
        properties.pop(key)
    config, problems = config_problems(properties, env={}, file=str(copy))
    assert problems == [] and config is not None and config.metrics_port == 9090

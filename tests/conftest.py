"""Fixtures: the real stand-in server (devserver.py) and the real connector over loopback websockets."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from pathlib import Path

import pytest

from pyexec_connector import logqueue
from pyexec_connector.config import build_server_config
from pyexec_connector.connector import Connector
from pyexec_connector.devserver import DevServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = Path(os.environ.get("PYEXEC_EXAMPLES", ROOT.parent / "shared" / "examples"))
if not EXAMPLES.is_dir():   # CI clones main with shared/ beside it; a developer's tree may differ
    EXAMPLES = ROOT / "tests" / "examples"
SOURCE = "pythonSource"
TOKEN = "tok-3f9a1c7e5b2d4c68a0e1f2b3c4d5e6f7"


def example(name: str) -> str:
    return (EXAMPLES / name).read_text()


@pytest.fixture(autouse=True)
def _fresh_log_rate_limits():
    """Rate-limited warnings (bad frames) start with their full budget in each test, as in a new process."""
    logqueue.reset_rate_limits()


@pytest.fixture
async def server():
    srv = DevServer(token=TOKEN, sources=(SOURCE,))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


class Running:
    """A connector running in this test's loop against `server`."""

    def __init__(self, connector: Connector, task: asyncio.Task):
        self.connector = connector
        self.task = task

    @property
    def session(self):
        return self.connector.sessions[SOURCE]

    async def stop(self):
        self.connector.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 10)


@pytest.fixture
async def start_connector(server):
    started: list[Running] = []

    async def start(wait: bool = True, sources: str = SOURCE, **properties) -> Running:
        props = {"targetServer": server.url, "authToken": TOKEN, "sources": sources, "shutdownGraceSeconds": "0.5"}
        props.update({k: str(v) for k, v in properties.items()})
        config = build_server_config(props, env={})
        connector = Connector(config, backoff_initial=0.02, backoff_max=0.2, handshake_timeout=2.0)
        running = Running(connector, asyncio.create_task(connector.run()))
        started.append(running)
        if wait:
            await connector.wait_ready(timeout=10)
        return running

    yield start
    for running in started:
        await running.stop()


@pytest.fixture
async def connected(server, start_connector):
    """(server, running connector), connected and configured."""
    running = await start_connector()
    return server, running


def console_command() -> list[str]:
    """The installed console script, or the module when running from a source tree."""
    exe = Path(sys.executable).parent / "pyexec-connector"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pyexec_connector"]


def free_port() -> int:
    """A loopback port nobody listens on now (for a subprocess's metricsPort or tcpProbePort)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

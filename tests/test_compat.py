"""The undocumented websockets/asyncio internals the fast paths rely on (pyexec_connector/compat.py):
an upgrade that drops one fails here, loudly, instead of showing up as a silent slowdown."""
from __future__ import annotations

import linecache
import logging

from websockets.protocol import Protocol

from pyexec_connector import compat

from .conftest import SOURCE


def test_every_internal_the_fast_paths_use_is_there():
    assert compat.missing() == []


def test_the_check_keeps_no_source_lines_in_memory():
    # issue 11 (h): made once at start; inspect.getsource cost the connector ~1 MiB, kept in linecache
    linecache.clearcache()
    assert compat.missing() == []
    assert linecache.cache == {}


def test_a_missing_internal_is_named_and_logged(monkeypatch, caplog):
    monkeypatch.delattr(Protocol, "send_text")    # where ClientProtocol inherits it from
    assert compat.missing() == ["websockets.client.ClientProtocol.send_text"]
    with caplog.at_level(logging.WARNING, logger="pyexec_connector.compat"):
        compat.report_missing()
    assert "ClientProtocol.send_text" in caplog.text


async def test_a_live_connection_takes_the_fast_paths(server, start_connector):
    running = await start_connector()
    answers = [await server.query({"code": f"x = {i}"}) for i in range(3)]
    assert [a.results["x"] for a in answers] == [0, 1, 2]
    counters = running.session.link.counters
    assert counters.direct_queries >= 3 and counters.queued_queries == 0
    assert server.connects(SOURCE) == 1

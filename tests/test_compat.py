"""The names the connector relies on: websockets' documented sans-I/O API (websocket.SANS_IO_NAMES) and
what is left of asyncio's internals (pyexec_connector/compat.py). A release that drops one fails here,
loudly, instead of breaking the link at run time."""
from __future__ import annotations

import linecache
import logging

import pytest
from websockets.extensions import permessage_deflate
from websockets.protocol import Protocol

from pyexec_connector import compat
from pyexec_connector.websocket import SANS_IO_NAMES

from .conftest import SOURCE


def test_every_name_the_connector_uses_is_there():
    assert compat.missing() == []


def test_the_check_keeps_no_source_lines_in_memory():
    # issue 11 (h): made once at start; inspect.getsource cost the connector ~1 MiB, kept in linecache
    linecache.clearcache()
    assert compat.missing() == []
    assert linecache.cache == {}


@pytest.mark.parametrize(("owner", "name", "shown"), [
    (Protocol, "send_text", "websockets.client.ClientProtocol.send_text"),    # where ClientProtocol has it from
    (Protocol, "close_expected", "websockets.client.ClientProtocol.close_expected"),
    (permessage_deflate, "enable_client_permessage_deflate",
     "websockets.extensions.permessage_deflate.enable_client_permessage_deflate"),
])
def test_a_missing_name_is_named_and_logged(monkeypatch, caplog, owner, name, shown):
    monkeypatch.delattr(owner, name)
    assert compat.missing() == [shown]
    with caplog.at_level(logging.WARNING, logger="pyexec_connector.compat"):
        compat.report_missing()
    assert shown in caplog.text


def test_an_attribute_the_protocol_sets_on_itself_is_checked_on_a_fresh_one(monkeypatch):
    from websockets.client import ClientProtocol
    assert ("websockets.client", "ClientProtocol.handshake_exc") in SANS_IO_NAMES
    original = ClientProtocol.__init__

    def without(self, *args, **kwargs):
        original(self, *args, **kwargs)
        del self.handshake_exc

    monkeypatch.setattr(ClientProtocol, "__init__", without)
    assert compat.missing() == ["websockets.client.ClientProtocol.handshake_exc"]


def test_the_link_uses_no_websockets_internals():
    """No private name of websockets, and neither its asyncio connection: only the sans-I/O layer."""
    import pathlib

    import pyexec_connector
    package = pathlib.Path(pyexec_connector.__file__).parent
    for module in ("link.py", "linksocket.py", "websocket.py", "dial.py", "compat.py"):
        text = (package / module).read_text()
        assert "websockets.asyncio" not in text and "websockets.legacy" not in text, module
        for internal in ("recv_messages", "process_event", "send_context", ".paused", "protocol.writes",
                         "reader.feed_data"):
            assert internal not in text, (module, internal)


async def test_a_live_connection_takes_queries_as_they_come(server, start_connector):
    running = await start_connector()
    answers = [await server.query({"code": f"x = {i}"}) for i in range(3)]
    assert [a.results["x"] for a in answers] == [0, 1, 2]
    counters = running.session.link.counters
    assert counters.queries == 3 and counters.held == 0 and counters.writes >= 3
    assert server.connects(SOURCE) == 1

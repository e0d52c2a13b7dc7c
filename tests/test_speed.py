"""The optional speed extra: uvloop is used when installed, unless PYEXEC_EVENT_LOOP=asyncio."""
from __future__ import annotations

import asyncio
import importlib.util

from pyexec_connector.eventloop import LOOP_ENV, event_loop_factory


def test_asyncio_when_asked(monkeypatch):
    monkeypatch.setenv(LOOP_ENV, "asyncio")
    assert event_loop_factory() == (None, "asyncio")


def test_uvloop_when_installed(monkeypatch):
    monkeypatch.delenv(LOOP_ENV, raising=False)
    factory, name = event_loop_factory()
    if importlib.util.find_spec("uvloop") is None:
        assert (factory, name) == (None, "asyncio")
        return
    assert name.startswith("uvloop ")
    loop = factory()
    try:
        assert isinstance(loop, asyncio.AbstractEventLoop)
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()

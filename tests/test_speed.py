"""The optional speed extra: uvloop is used when installed, unless CONNECTOR_EVENT_LOOP=asyncio."""
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


def test_jobs_pickle_to_equal_jobs_through_a_tuple():
    # process mode sends a Job per query: its pickle must round-trip exactly, and not via getstate
    import pickle

    from pyexec_connector.engine.base import Job
    from pyexec_connector.request import parse_query

    request = parse_query({"name": "n", "code": "x = 1", "presetValues": {"x": [1, {"y": None}]},
                           "limitReturnTo": "x"})
    job = Job(request, "x = 1", "x = 1", True)
    copy = pickle.loads(pickle.dumps(job, pickle.HIGHEST_PROTOCOL))
    assert copy == job and copy.request == request and copy is not job
    assert Job.__reduce__(job)[1][0] is request

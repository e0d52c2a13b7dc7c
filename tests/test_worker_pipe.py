"""A worker's pipe is untrusted input: a frame announcing more than the largest legitimate message, or one
that cannot be decoded, ends that worker at once (its query gets the worker-died error) and the connector
never waits for (or allocates) the announced bytes. Legitimate messages near the limit still pass. The
real connector and workers against devserver.py."""
from __future__ import annotations

import time

import psutil
import pytest

from pyexec_connector import errors

from .conftest import SOURCE

MiB = 1024 * 1024


async def start(server, start_connector, **properties):
    server.set_source_config(SOURCE, {"executionMode": "process", "workers": 1})
    running = await start_connector(**properties)
    assert (await server.query({"code": "warm = 1"})).results == {"warm": 1}
    return running


@pytest.mark.parametrize("announced", [2 ** 31, 3 * MiB])
async def test_a_frame_over_the_limit_ends_the_worker(server, start_connector, announced):
    await start(server, start_connector, maxMessageBytes=MiB)
    code = ("import os, struct, sys, time\n"
            "os.write(int(sys.argv[1]), struct.pack('!I', size) + b'junk' * 16)\n"
            "time.sleep(5)\n"
            "after = 1")
    connector = psutil.Process()      # the connector runs in this test's process
    before = connector.memory_info().rss
    began = time.monotonic()
    result = await server.query({"code": code, "presetValues": {"size": announced}}, timeout=15)
    # answered at once, not after the code's 5 s sleep: the worker was killed as the prefix came in
    assert time.monotonic() - began < 4.0
    assert result.status == 400 and result.error_code == errors.WORKER_DIED, result.replies
    assert "protocol violation" in result.body["parameters"][0] and "malformed" in result.body["parameters"][0]
    # no spike: nothing near the announced size (nor maxMessageBytes) was allocated for it
    assert connector.memory_info().rss - before < 32 * MiB
    assert (await server.query({"code": "ok = 1"})).results == {"ok": 1}


async def test_results_and_errors_near_or_over_the_limit_are_answered_not_fatal(server, start_connector):
    running = await start(server, start_connector, maxMessageBytes=MiB)
    near = await server.query({"code": "big = 'n' * (1024 * 1024 - 200)", "captureOutput": True})
    assert near.status == 200 and len(near.results["big"]) == MiB - 200
    over = await server.query({"code": "big = 'o' * (3 * 1024 * 1024)", "captureOutput": True})
    assert over.status == 400 and over.error_code == errors.TOO_LARGE
    assert "limitReturnTo" in over.body["messageTemplate"]
    raised = await server.query({"code": "from pyexec_connector import QueryError\n"
                                         "raise QueryError('my.code', 'huge {0}', ['e' * (3 * 1024 * 1024)])"})
    assert raised.status == 400 and raised.error_code == "my.code"
    assert "over maxMessageBytes" in raised.body["messageTemplate"]
    assert running.session.engine.stats().worker_restarts == 0
    assert (await server.query({"code": "ok = 1"})).results == {"ok": 1}

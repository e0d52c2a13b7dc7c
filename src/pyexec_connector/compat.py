"""Every use of an undocumented internal of websockets or asyncio, in one place.

The connector's fast paths lean on a few attributes these libraries do not promise to keep: websockets'
message queue (`recv_messages.frames`), its sans-I/O protocol and transport (`protocol.send_text`,
`data_to_send`, `transport.write`, `send_context`, `paused`), and asyncio's `StreamReader._buffer`.
Each fast path asks this module whether its internals are there and falls back to the public API
when they are not; `missing()` lists what is gone, the connector logs it at start-up, and
tests/test_compat.py fails on it, so an upgrade that loses a fast path fails CI instead of showing
up as a silent slowdown."""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

# websockets is imported only by the functions that need it: worker processes import this module for
# the asyncio part and must not pay for websockets.
log = logging.getLogger(__name__)

def missing() -> list[str]:
    """The internals the fast paths rely on that this websockets/asyncio lacks (empty: all there).
    Instance attributes are looked for in the source of the class that sets them."""
    from websockets.asyncio.client import ClientConnection
    from websockets.asyncio.connection import Connection
    from websockets.asyncio.messages import Assembler
    from websockets.client import ClientProtocol
    wanted = [
        (ClientConnection, "process_event", False), (ClientConnection, "send_context", False),
        (Connection, "recv_messages", True), (Connection, "protocol", True), (Connection, "transport", True),
        (Connection, "paused", True), (Assembler, "frames", True),
        (ClientProtocol, "send_text", False), (ClientProtocol, "data_to_send", False),
        (ClientProtocol, "close_expected", False), (ClientProtocol, "state", False),
        (asyncio.StreamReader, "_buffer", True), (asyncio.StreamReader, "_eof", True),
    ]
    return [f"{cls.__module__}.{cls.__qualname__}.{name}" for cls, name, on_instance in wanted
            if not (_sets(cls, name) if on_instance else hasattr(cls, name))]


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
    """Log, once at start-up, any fast path this websockets/asyncio cannot take."""
    gone = missing()
    if gone:
        log.warning("running without some fast paths: this websockets/asyncio lacks %s (the connector "
                    "works, more slowly; see pyexec_connector/compat.py)", ", ".join(gone))


# ---- asyncio: StreamReader ------------------------------------------------------------------------

def stream_buffer(reader: asyncio.StreamReader) -> bytearray:
    """What a StreamReader received and nobody read yet."""
    return reader._buffer     # type: ignore[attr-defined]  # noqa: SLF001 - see the module docstring


def stream_ended(reader: asyncio.StreamReader) -> bool:
    return reader._eof        # type: ignore[attr-defined]  # noqa: SLF001


# ---- websockets: taking messages as they are parsed ------------------------------------------------

_direct_connection: type | None = None


def direct_connection() -> type[ClientConnection]:
    """websockets' client connection, handing each whole text or binary message to `on_message` as it
    is parsed, in the step the data came in, when nothing is queued before it (order is kept): a query
    then skips the message queue, the wake-up of the receiving task and its recv() — one loop iteration
    of latency and ~10 us of CPU. `on_message` returns False for what it leaves to recv()."""
    global _direct_connection
    if _direct_connection is None:
        from websockets.asyncio.client import ClientConnection
        from websockets.frames import Frame, Opcode
        whole_messages = (Opcode.TEXT, Opcode.BINARY)

        class DirectConnection(ClientConnection):
            on_message: Callable[[bytes], bool] | None = None

            def process_event(self, event: Any) -> None:
                handler = self.on_message
                if handler is not None and type(event) is Frame and event.fin and event.opcode in whole_messages \
                        and not len(self.recv_messages.frames) and handler(bytes(event.data)):
                    return
                super().process_event(event)

        _direct_connection = DirectConnection
    return _direct_connection


def can_take_directly(ws: ClientConnection) -> bool:
    return isinstance(ws, direct_connection()) and hasattr(ws.recv_messages, "frames")


# ---- websockets: writing several messages in one socket write ---------------------------------------

def batch_sender(ws: ClientConnection) -> Callable[[list[str]], Awaitable[None]] | None:
    """Several text messages in one socket write. websockets writes each message separately (one send()
    system call each, the largest cost per reply under load); its sans-I/O protocol frames the messages,
    and its send context keeps the state checks, flow control and close handling of `send()`. None when
    this websockets lacks those parts: the caller then sends one by one."""
    protocol_, transport = getattr(ws, "protocol", None), getattr(ws, "transport", None)
    if protocol_ is None or transport is None or not hasattr(ws, "send_context") or \
            not hasattr(protocol_, "data_to_send"):
        return None

    async def send_batch(frames: list[str]) -> None:
        async with ws.send_context():
            frame_and_write(protocol_, transport, frames)

    return send_batch


def frame_and_write(protocol_: Any, transport: Any, frames: Iterable[str]) -> None:
    """Frame the text messages with websockets' sans-I/O protocol and write them in one socket write."""
    for frame in frames:
        protocol_.send_text(frame.encode())
    chunks = protocol_.data_to_send()
    if all(chunks):     # only frames (no end-of-stream marker): one write
        transport.write(b"".join(chunks))
    else:               # never seen while open; keep websockets' own handling
        for chunk in chunks:
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()


def direct_writer(ws: ClientConnection, outbox: deque[str], count: Callable[[], int],
                  sendable: Callable[[str], str]) -> Callable[[], int] | None:
    """Writing queued frames without waiting: the first `count()` frames of `outbox`, in one socket
    write, only while the connection is open, expects no close and its transport takes data without
    pushing back (websockets' own flow control). Returns how many it wrote (0: none, nothing taken).
    None when this websockets lacks the parts."""
    if batch_sender(ws) is None or not hasattr(ws, "paused"):
        return None
    from websockets.protocol import State
    protocol_, transport = ws.protocol, ws.transport

    def write_now() -> int:
        if protocol_.state is not State.OPEN or ws.paused or protocol_.close_expected() or transport.is_closing():
            return 0
        taken = count()
        frame_and_write(protocol_, transport, map(sendable, itertools.islice(outbox, taken)))
        return taken

    return write_now


def socket_fd(ws: ClientConnection) -> int | None:
    """The websocket's file descriptor (for forkguard), if it has one."""
    transport = getattr(ws, "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock.fileno() if sock is not None else None

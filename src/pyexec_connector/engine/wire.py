"""Messages between the connector and its worker processes: length-prefixed pickles over a socket pair.

The connector unpickles what a worker sends with a restricted unpickler (plain data and QueryError only):
a worker runs user code, and a crafted pickle must not run code in the connector."""
from __future__ import annotations

import asyncio
import io
import pickle
import struct
from collections.abc import Callable
from typing import Any

_LENGTH = struct.Struct("!I")
PROTOCOL = pickle.HIGHEST_PROTOCOL


_ANSWERED = struct.Struct("!cQQQ")    # b"A", qid, cache hits, cache misses; then the frame (UTF-8)
# A worker's "I have read what you sent": what it writes after taking messages when it has nothing else
# to say. The connector holds further runs for a worker until it hears from it (see process._Worker).
ACK = _LENGTH.pack(1) + b"K"
# A relayed query: b"R", qid, the lengths of the reply address and of the code text (0: the frame's own
# code); then the address, the text and the query frame as received. See ProcessEngine.relay().
_RELAY = struct.Struct("!cQII")
ACKED = ("ack",)


def pack(message: Any) -> bytes:
    data = pickle.dumps(message, PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def pack_answered(qid: int, frame: str, cache_counts: tuple[int, int]) -> bytes:
    """("answered", qid, frame, cache_counts) without pickle: the most common message from a worker, and
    one the connector decodes without a restricted unpickler."""
    text = frame.encode("utf-8", "surrogatepass")
    return _LENGTH.pack(_ANSWERED.size + len(text)) + _ANSWERED.pack(b"A", qid, *cache_counts) + text


def pack_relay(qid: int, reply_address: str, text: str | None, raw: bytes) -> bytes:
    address = reply_address.encode("utf-8", "surrogatepass")
    code = text.encode("utf-8", "surrogatepass") if text is not None else b""
    return b"".join((_LENGTH.pack(_RELAY.size + len(address) + len(code) + len(raw)),
                     _RELAY.pack(b"R", qid, len(address), len(code) if text is not None else 0xFFFFFFFF),
                     address, code, raw))


async def read(reader: asyncio.StreamReader, *, trusted: bool) -> Any:
    """The next message; raises asyncio.IncompleteReadError at the end of the stream."""
    header = await reader.readexactly(_LENGTH.size)
    data = await reader.readexactly(_LENGTH.unpack(header)[0])
    return decode(data, trusted)


def decode(data: bytes | memoryview, trusted: bool) -> Any:
    first = data[:1]        # pickles start with the PROTO opcode, b"\x80"
    if first == b"A":
        _, qid, hits, misses = _ANSWERED.unpack_from(data)
        return "answered", qid, bytes(data[_ANSWERED.size:]).decode("utf-8", "surrogatepass"), (hits, misses)
    if first == b"K" and len(data) == 1:
        return ACKED
    if first == b"R" and trusted:     # only the connector relays queries, to a worker
        _, qid, address_size, code_size = _RELAY.unpack_from(data)
        start = _RELAY.size + address_size
        address = bytes(data[_RELAY.size:start]).decode("utf-8", "surrogatepass")
        if code_size == 0xFFFFFFFF:
            return "relay", qid, address, None, bytes(data[start:])
        end = start + code_size
        return "relay", qid, address, bytes(data[start:end]).decode("utf-8", "surrogatepass"), bytes(data[end:])
    return pickle.loads(data) if trusted else _DataUnpickler(io.BytesIO(data)).load()


class Reader(asyncio.StreamReader):
    """A StreamReader that can hand messages to a synchronous handler as they arrive, sparing the loop
    iteration that waking the reading task costs. Only while `handler` is set (its owner sets it while
    it waits in read() with nothing buffered) and only for messages `handler` accepts: it returns False
    for one it cannot handle at once, which is then buffered, with everything after it, for read() —
    so messages are always handled in the order they came."""

    handler: Callable[[Any], bool] | None = None
    after: Callable[[], None] | None = None     # called once the handler took what arrived
    on_data: Callable[[], None] | None = None   # called first whenever anything arrives
    trusted = False

    def feed_data(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data()
        handler = self.handler
        if handler is None or self._buffer or self._eof:
            super().feed_data(data)
            return
        view = memoryview(data)
        start, end = 0, len(data)
        after = self.after
        try:
            while end - start >= _LENGTH.size:
                length = _LENGTH.unpack_from(view, start)[0]
                stop = start + _LENGTH.size + length
                if stop > end:
                    break
                message = decode(view[start + _LENGTH.size:stop], self.trusted)
                if not handler(message):
                    break
                start = stop
                handler = self.handler     # the handler may have stepped aside
                if handler is None:
                    break
        except Exception:   # noqa: BLE001 - a garbled message: read() meets it and reports it
            pass
        finally:
            view.release()
        if start and after is not None:
            after()
        if start < end:
            super().feed_data(data[start:] if start else data)


async def open_pipe(sock: Any, limit: int, trusted: bool) -> tuple[Reader, asyncio.StreamWriter]:
    """asyncio.open_connection(sock=...), with a Reader."""
    loop = asyncio.get_running_loop()
    reader = Reader(limit=limit, loop=loop)
    reader.trusted = trusted
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def has_message(reader: asyncio.StreamReader) -> bool:
    """Whether a whole message is already buffered (read() would return without waiting)."""
    buffer = reader._buffer     # noqa: SLF001 - asyncio's StreamReader keeps what it received there
    return len(buffer) >= _LENGTH.size and len(buffer) >= _LENGTH.size + _LENGTH.unpack_from(buffer)[0]


_ALLOWED = {("pyexec_connector.errors", "QueryError")}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a worker sent a {module}.{name}: only plain data may cross")

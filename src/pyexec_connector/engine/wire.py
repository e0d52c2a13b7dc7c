"""The codec of the worker pipe: each message (engine/messages.py) as a 4-byte length and a body.

Bodies are pickles of a plain tuple, the kind's number and the fields (a pickled NamedTuple names its
class, which the connector's restricted unpickler would have to look up for every message: that cost
streamed replies a third more CPU per query), except the three messages of every query, which have
binary formats of their own (measured: pickling them cost the connector more than the rest of its work
on a relayed query, see docs/PERFORMANCE.md): `Relay` (b"R"), `Answered` (b"A"), `Credit` (b"C") and
`Ack` (b"K").

A worker runs user code, so what it sends is untrusted input: the connector unpickles it with a
restricted unpickler (message types, plain data and QueryError only), never accepts a frame longer
than the largest legitimate message (`frame_limit`), and a frame it cannot decode ends that worker."""
from __future__ import annotations

import asyncio
import io
import pickle
import struct
from typing import Any

from . import messages
from .messages import ACKED, KINDS, Answered, Credit, Relay

_LENGTH = LENGTH = struct.Struct("!I")       # every frame's prefix: its body's length
PROTOCOL = pickle.HIGHEST_PROTOCOL
_ANSWERED = struct.Struct("!cQQQ")    # b"A", qid, cache hits, cache misses; then the frame (UTF-8)
_RELAY = struct.Struct("!cQIId")      # b"R", qid, address and code lengths, take_by; then address, code, frame
_CREDIT = struct.Struct("!cQQ")       # b"C", granted, received
_NO_TEXT = 0xFFFFFFFF
_A, _K, _C, _R = b"AKCR"      # the binary messages' first bytes, as numbers
_new = tuple.__new__      # a NamedTuple without its Python-level __new__: these are made per query
ACK = _LENGTH.pack(1) + b"K"
# with the length prefix, so that each is one pack (a worker writes one or both with most writes)
_ANSWERED_FRAME = struct.Struct("!IcQQQ")
_CREDIT_FRAME = struct.Struct("!IcQQ")
_RELAY_FRAME = struct.Struct("!IcQIId")
# Room for a message's own fields around the largest frame a worker may send (maxMessageBytes).
FRAMING_ALLOWANCE = 64 * 1024


class MalformedMessage(ValueError):
    """A frame that is not a message this side accepts (garbled, too long, of a forbidden type)."""


def frame_limit(max_message_bytes: int) -> int:
    """The longest body a worker may send: anything longer is a protocol violation."""
    return max_message_bytes + FRAMING_ALLOWANCE


def encode(message: Any) -> bytes:
    """The message's frame, length prefix included."""
    kind = type(message)
    if kind is Answered:
        qid, frame, (hits, misses) = message
        return encode_answered(qid, frame, hits, misses)
    if kind is Credit:
        return encode_credit(*message)
    if kind is Relay:
        return encode_run(message, message[4])
    if message is ACKED:
        return ACK
    data = pickle.dumps((_NUMBERS[kind], *message), PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def encode_answered(qid: int, frame: str, hits: int, misses: int) -> bytes:
    """An Answered's frame from its fields: a worker ends most runs with one, and needs no message for it."""
    text = frame.encode("utf-8", "surrogatepass")
    return _ANSWERED_FRAME.pack(_ANSWERED.size + len(text), b"A", qid, hits, misses) + text


def encode_credit(granted: int, received: int) -> bytes:
    """A Credit's frame from its fields (a worker sends one with most of its writes)."""
    return _CREDIT_FRAME.pack(_CREDIT.size, b"C", granted, received)


def encode_run(message: Any, take_by: float) -> bytes:
    """A Relay's or Run's frame with `take_by` for its own (a run is encoded when it is sent, once per
    worker it goes to)."""
    if type(message) is Relay:
        qid, reply_address, text, raw, _ = message
        address = reply_address.encode("utf-8", "surrogatepass")
        if text is None:
            return b"".join((_RELAY_FRAME.pack(_RELAY.size + len(address) + len(raw), b"R", qid, len(address),
                                               _NO_TEXT, take_by), address, raw))
        code = text.encode("utf-8", "surrogatepass")
        return b"".join((_RELAY_FRAME.pack(_RELAY.size + len(address) + len(code) + len(raw), b"R", qid,
                                           len(address), len(code), take_by), address, code, raw))
    return encode(_new(type(message), (*message[:-1], take_by)))


def decode(data: bytes | memoryview, trusted: bool) -> Any:
    # the first byte as a number: a memoryview's slice compared with bytes goes through the buffer
    # protocol, for every message either side reads (pickles start with the PROTO opcode, 0x80)
    first = data[0] if data else -1
    if first == _A:
        _, qid, hits, misses = _ANSWERED.unpack_from(data)
        return _new(Answered, (qid, str(data[_ANSWERED.size:], "utf-8", "surrogatepass"), (hits, misses)))
    if first == _K and len(data) == 1:
        return ACKED
    if first == _C:
        if len(data) != _CREDIT.size:
            raise MalformedMessage(f"a credit of {len(data)} bytes")
        _, granted, received = _CREDIT.unpack_from(data)
        return _new(Credit, (granted, received))
    if first == _R and trusted:     # only the connector relays queries, to a worker
        _, qid, address_size, code_size, take_by = _RELAY.unpack_from(data)
        start = _RELAY.size + address_size
        address = str(data[_RELAY.size:start], "utf-8", "surrogatepass")
        if code_size == _NO_TEXT:
            return _new(Relay, (qid, address, None, bytes(data[start:]), take_by))
        end = start + code_size
        return _new(Relay, (qid, address, str(data[start:end], "utf-8", "surrogatepass"), bytes(data[end:]), take_by))
    if trusted:
        fields = pickle.loads(data)
        return _new(KINDS[fields[0]], fields[1:])
    try:
        fields = _DataUnpickler(io.BytesIO(data)).load()
        kind = KINDS[fields[0]] if type(fields) is tuple and type(fields[0]) is int else None
    except Exception as exc:
        raise MalformedMessage(f"{type(exc).__name__}: {exc}") from None
    if kind not in _FROM_WORKER:
        raise MalformedMessage("not a message a worker may send")
    message: Any = _new(kind, fields[1:])
    if len(message) != _SIZES[kind]:
        raise MalformedMessage(f"a {kind.__name__} with {len(message)} fields")
    return message


class Reader(asyncio.StreamReader):
    """A StreamReader that knows what its stream may hold (for read()): used where messages are awaited
    one at a time (the zygote's pipe). Worker pipes are read by engine/channel.py's protocols."""

    trusted = False
    max_size: int | None = None                 # the longest body accepted (None: any)


async def read(reader: Reader) -> Any:
    """The next message; raises asyncio.IncompleteReadError at the end of the stream and
    MalformedMessage for a frame this side does not accept (before reading a body over the limit)."""
    header = await reader.readexactly(_LENGTH.size)
    length = _LENGTH.unpack(header)[0]
    if reader.max_size is not None and length > reader.max_size:
        raise MalformedMessage(f"a message of {length} bytes announced, over the limit of {reader.max_size}")
    return decode(await reader.readexactly(length), reader.trusted)


async def open_pipe(sock: Any, trusted: bool, max_size: int | None = None) -> tuple[Reader, asyncio.StreamWriter]:
    """asyncio.open_connection(sock=...), with a Reader."""
    loop = asyncio.get_running_loop()
    reader = Reader(limit=2 ** 20, loop=loop)
    reader.trusted = trusted
    reader.max_size = max_size
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


_NUMBERS = {kind: number for number, kind in enumerate(KINDS)}
_FROM_WORKER = frozenset(messages.FROM_WORKER)
_SIZES = {kind: len(kind._fields) for kind in KINDS}  # type: ignore[attr-defined]  # NamedTuples
_ALLOWED = {("pyexec_connector.errors", "QueryError")}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a worker sent a {module}.{name}: only plain data may cross")

"""Messages between the connector and its worker processes: length-prefixed pickles over a socket pair.

The connector unpickles what a worker sends with a restricted unpickler (plain data and QueryError only):
a worker runs user code, and a crafted pickle must not run code in the connector."""
from __future__ import annotations

import asyncio
import io
import pickle
import struct
from typing import Any

_LENGTH = struct.Struct("!I")
PROTOCOL = pickle.HIGHEST_PROTOCOL


def pack(message: Any) -> bytes:
    data = pickle.dumps(message, PROTOCOL)
    return _LENGTH.pack(len(data)) + data


async def read(reader: asyncio.StreamReader, *, trusted: bool) -> Any:
    """The next message; raises asyncio.IncompleteReadError at the end of the stream."""
    header = await reader.readexactly(_LENGTH.size)
    data = await reader.readexactly(_LENGTH.unpack(header)[0])
    return pickle.loads(data) if trusted else _DataUnpickler(io.BytesIO(data)).load()


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

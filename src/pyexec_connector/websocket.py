"""One client websocket, on websockets' documented sans-I/O layer (`websockets.client.ClientProtocol`).

`ClientWebSocket` turns bytes from the network into whole messages and text frames into bytes for it,
answers pings, echoes a close and keeps the keepalive's ping in flight; it writes to the transport it is
given and does nothing else: no task, no timer, no queue. The asyncio side (linksocket.py) owns the
transport and decides when to read, write and close.

Only names websockets documents for the sans-I/O layer are used here; `SANS_IO_NAMES` lists them, and
tests/test_compat.py fails should a release drop one."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.frames import Frame, Opcode
from websockets.http11 import USER_AGENT, Response
from websockets.protocol import State
from websockets.uri import WebSocketURI, parse_uri

# (module, dotted name): what this module and the link use of websockets' public sans-I/O API
SANS_IO_NAMES: tuple[tuple[str, str], ...] = (
    *(("websockets.client", f"ClientProtocol.{name}") for name in (
        "connect", "send_request", "receive_data", "receive_eof", "events_received", "data_to_send",
        "close_expected", "send_text", "send_ping", "send_close", "fail", "state", "close_exc",
        "handshake_exc")),
    ("websockets.extensions.permessage_deflate", "enable_client_permessage_deflate"),
    ("websockets.frames", "Frame"), ("websockets.frames", "Opcode.TEXT"), ("websockets.frames", "Opcode.BINARY"),
    ("websockets.frames", "Opcode.CONT"), ("websockets.frames", "Opcode.PONG"),
    ("websockets.http11", "Response"), ("websockets.http11", "USER_AGENT"),
    ("websockets.protocol", "State.OPEN"), ("websockets.protocol", "State.CLOSED"),
    ("websockets.uri", "parse_uri"), ("websockets.uri", "WebSocketURI"),
    ("websockets.exceptions", "ConnectionClosed"), ("websockets.exceptions", "InvalidHandshake"),
    ("websockets.exceptions", "InvalidURI"), ("websockets.exceptions", "InvalidStatus"),
)

_TEXT, _BINARY, _CONT, _PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PONG
_OPEN = State.OPEN


@dataclass(frozen=True)
class SocketOptions:
    """What shapes one websocket: the connector's defaults with connectKWArgs over them."""
    max_size: int | None
    open_timeout: float | None = 10.0
    close_timeout: float | None = 5.0
    ping_interval: float | None = None
    ping_timeout: float | None = 20.0
    compression: str | None = None
    origin: str | None = None
    subprotocols: Sequence[str] | None = None
    additional_headers: Mapping[str, str] | None = None
    user_agent_header: str | None = USER_AGENT
    proxy: str | bool | None = True             # True: the environment's proxy (https_proxy, no_proxy...)
    write_limit: int | tuple[int, int | None] = 2 ** 15
    ssl: Any = None                               # an SSLContext for wss://
    connection: dict[str, Any] = field(default_factory=dict)   # more loop.create_connection keywords


class ClientWebSocket:
    """websockets' ClientProtocol over one transport. `receive()` returns whole messages (bytes, text or
    binary alike: the frames' own JSON says what they are) and, first, the handshake's Response."""

    def __init__(self, url: str, options: SocketOptions, logger: logging.Logger | logging.LoggerAdapter):
        self.uri: WebSocketURI = parse_uri(url)
        self.options = options
        extensions = enable_client_permessage_deflate(None) if options.compression == "deflate" else None
        self.protocol = ClientProtocol(self.uri, origin=options.origin, extensions=extensions,  # type: ignore[arg-type]
                                       subprotocols=options.subprotocols, max_size=options.max_size,  # type: ignore[arg-type]
                                       logger=logger)
        self.transport: Any = None
        self._fragments: list[bytes] = []
        self._ping: bytes | None = None          # the keepalive ping awaiting its pong
        self.pong_received = False

    # ---- the handshake ----------------------------------------------------------------------------
    def start(self, transport: Any) -> None:
        """Send the opening handshake's request on a new transport."""
        self.transport = transport
        request = self.protocol.connect()
        if self.options.additional_headers:
            request.headers.update(self.options.additional_headers)
        if self.options.user_agent_header is not None:
            request.headers.setdefault("User-Agent", self.options.user_agent_header)
        self.protocol.send_request(request)
        self._write_out()

    def handshake_error(self) -> Exception | None:
        """Why the opening handshake failed (an InvalidHandshake, or the end of the stream), or None."""
        exc = self.protocol.handshake_exc
        return exc if exc is None or isinstance(exc, InvalidHandshake | OSError) else InvalidHandshake(str(exc))

    # ---- reading -----------------------------------------------------------------------------------
    def receive(self, data: bytes) -> list[bytes | Response]:
        """Bytes from the network in; whole messages (and the handshake's Response) out. Pongs to the
        server's pings and the echo of its close frame are written before this returns."""
        self.protocol.receive_data(data)
        messages: list[bytes | Response] = []
        for event in self.protocol.events_received():
            if type(event) is not Frame:
                messages.append(event)  # type: ignore[arg-type]  # the Response: the first event, once
                continue
            opcode = event.opcode
            if opcode is _TEXT or opcode is _BINARY:
                if event.fin:
                    messages.append(bytes(event.data))
                else:
                    self._fragments = [bytes(event.data)]
            elif opcode is _CONT:
                self._fragments.append(bytes(event.data))
                if event.fin:       # the protocol bounded the whole message by max_size as it came
                    messages.append(b"".join(self._fragments))
                    self._fragments = []
            elif opcode is _PONG and self._ping is not None and bytes(event.data) == self._ping:
                self._ping = None
                self.pong_received = True
        self._write_out()
        return messages

    def receive_eof(self) -> None:
        self.protocol.receive_eof()
        self._write_out()

    # ---- writing -----------------------------------------------------------------------------------
    @property
    def open(self) -> bool:
        return self.protocol.state is _OPEN

    def send_texts(self, frames: Iterable[str]) -> None:
        """Frame text messages and write them in one socket write. A lone surrogate (user data such as
        chr(0xD800)) cannot be UTF-8; in a JSON frame it sits inside a string, where its \\uXXXX escape
        means the same, so it goes out escaped rather than failing the connection."""
        send_text = self.protocol.send_text
        for frame in frames:
            try:
                data = frame.encode()
            except UnicodeEncodeError:
                data = frame.encode("utf-8", "backslashreplace")
            send_text(data)
        self._write_out()

    def ping(self) -> None:
        """Send the keepalive's ping; `pong_received` tells when its pong came."""
        self._ping = os.urandom(4)
        self.pong_received = False
        self.protocol.send_ping(self._ping)
        self._write_out()

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake (no-op unless open)."""
        if self.open:
            self.protocol.send_close(code, reason)
            self._write_out()

    def fail(self, code: int, reason: str) -> None:
        """Close the websocket at once, as websockets does on a protocol error."""
        if self.protocol.state is not State.CLOSED:
            self.protocol.fail(code, reason)
            self._write_out()

    def close_expected(self) -> bool:
        return self.protocol.close_expected()

    def closed_error(self) -> ConnectionClosed:
        """The ConnectionClosed that says how the websocket ended."""
        return self.protocol.close_exc

    def _write_out(self) -> None:
        transport = self.transport
        chunks = self.protocol.data_to_send()
        if not chunks or transport is None or transport.is_closing():
            return
        if all(chunks):
            transport.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])
            return
        for chunk in chunks:        # an empty chunk: the end of the stream (half-close)
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()

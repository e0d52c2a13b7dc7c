"""One socket of a source's link: the asyncio Protocol that moves bytes between the transport and the
sans-I/O websocket (websocket.py), and the Vantiq exchange on it (validate, connectExtension, then
queries). It has one read path (`data_received`) and one write path (`flush`).

Reading: every message is taken in the step its bytes arrived, in order. While the outbox is full a
query's replies would only grow it, so messages are held (at most what one read brought) and reading
pauses until the outbox has room again.

Writing: frames queued in the step go out together at its end (`schedule_flush`), or at once
(`flush`) for a caller that just queued a burst; both stop while the transport pushes back
(pause_writing) and go on when it resumes."""
from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import protocol
from .errors import BAD_QUERY, TOO_LARGE, QueryError
from .outbox import Outbox
from .websocket import ClientWebSocket

log = logging.getLogger("pyexec_connector.link")

BATCH_FRAMES = 64             # queued frames written to the socket at once
BATCH_BYTES = 256 * 1024


class LinkState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"    # opening the socket and validating the token
    ATTACHING = "attaching"      # connectExtension sent, waiting for configureExtension
    READY = "ready"              # configured: queries flow, the outbox drains
    BACKOFF = "backoff"          # waiting before the next attempt
    CLOSED = "closed"


class LinkHandler(Protocol):
    def on_query(self, frame: protocol.QueryFrame) -> None: ...
    def on_configure(self, config: Any) -> None: ...
    def on_unreadable_query(self, reply_address: str, error: QueryError) -> None: ...


class Refused(Exception):
    """The server refused connectExtension (source unknown, already served...): retry later."""

    def __init__(self, status: int, message: str):
        super().__init__(f"status {status}: {message}")
        self.status = status


class ProtocolViolation(Exception):
    """The server said something that makes this socket unusable: reconnect."""


@dataclass(slots=True)
class LinkCounters:
    """What the link's read and write paths did (figures for tests, metrics and profiling)."""
    queries: int = 0            # query frames taken
    held: int = 0               # messages held because the outbox was full when they came
    read_pauses: int = 0        # times reading paused for the outbox's room
    writes: int = 0             # socket writes of queued frames (each up to BATCH_FRAMES frames)


class LinkStatus:
    """The link's state, shared by the link and the socket it serves on: who may send (ready), and
    the bookkeeping a configured socket resets (backoff, the last problem logged)."""

    def __init__(self, source_name: str, on_state: Callable[[str, LinkState], None] | None, backoff: Any):
        self.source_name = source_name
        self.state = LinkState.IDLE
        self.ready = asyncio.Event()
        self.backoff = backoff
        self.last_problem: str | None = None
        self._on_state = on_state

    def set(self, state: LinkState) -> None:
        if state is LinkState.READY:
            self.backoff.reset()
            self.last_problem = None
            self.ready.set()
        else:
            self.ready.clear()
        if state is not self.state:
            self.state = state
            if self._on_state is not None:
                self._on_state(self.source_name, state)


class LinkSocket(asyncio.Protocol):
    """One websocket's life for the link: the opening handshake (`opened`), validate (`validate()`),
    connectExtension (`attach()`), then queries until it ends (`ended` holds why)."""

    def __init__(self, ws: ClientWebSocket, outbox: Outbox, handler: LinkHandler, status: LinkStatus,
                 counters: LinkCounters, *, max_message_bytes: int, attach_timeout: float, connect_frame: str):
        loop = asyncio.get_running_loop()
        self.ws = ws
        self._loop = loop
        self._outbox = outbox
        self._handler = handler
        self._status = status
        self._counters = counters
        self._limit = max_message_bytes
        self._attach_timeout = attach_timeout
        self._connect_frame = connect_frame
        self.opened: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[BaseException] = loop.create_future()
        self.configured: asyncio.Future[Any] = loop.create_future()     # the first configure's document
        self.lost: asyncio.Future[None] = loop.create_future()          # the transport is closed
        self._validated: asyncio.Future[protocol.StatusFrame] | None = None
        self._transport: asyncio.Transport | None = None
        self._validating = False
        self._flush_handle: asyncio.Handle | None = None
        self._write_paused = False
        self._held: deque[bytes] = deque()
        self._room_waiter: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None      # the attach timeout, or the close timeout
        self._closing = False       # the close timeout is armed

    # ---- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport     # type: ignore[assignment]
        limit = self.ws.options.write_limit
        high, low = limit if isinstance(limit, tuple) else (limit, None)
        transport.set_write_buffer_limits(high, low)    # type: ignore[attr-defined]
        self.ws.start(transport)

    def data_received(self, data: bytes) -> None:
        held = self._held
        for message in self.ws.receive(data):
            if type(message) is not bytes:
                self._handshake_done()
            elif self.ended.done():
                continue            # the link is closing this socket: nothing more is taken from it
            elif held or (not self._outbox.not_full and self._status.ready.is_set()):
                held.append(message)
                self._counters.held += 1
            else:
                self._take(message)
        if held and self._room_waiter is None:
            self._pause_reading()
        if not self._closing and self.ws.close_expected():
            self._expect_close()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        return None         # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.ws.receive_eof()
        self._cancel_timers()
        if self._room_waiter is not None:
            self._room_waiter.cancel()
        reason: BaseException
        if not self.opened.done():
            reason = self.ws.handshake_error() or exc or ConnectionError(
                "the server closed the connection during the opening handshake")
            self.opened.set_exception(reason)
            self.opened.exception()     # retrieved: nobody need await it after a failure
        else:
            reason = self.ws.closed_error()
        for future in (self._validated, self.configured):
            if future is not None and not future.done():
                future.set_exception(reason)
                future.exception()
        if not self.ended.done():
            self.ended.set_result(reason)
        self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.flush()

    # ---- the link's side -------------------------------------------------------------------------
    async def validate(self, token_frame: str, timeout: float) -> protocol.StatusFrame:
        """Send validate; the server's status answer (any other frame meanwhile is logged and skipped)."""
        self._validated = self._loop.create_future()
        self._validating = True
        self.ws.send_texts((token_frame,))
        try:
            async with asyncio.timeout(timeout):
                return await self._validated
        finally:
            self._validating = False

    def attach(self) -> None:
        """Send connectExtension; configureExtension must come within the attach timeout."""
        self._status.set(LinkState.ATTACHING)
        self._arm(self._attach_timeout, lambda: self._end(ProtocolViolation(
            f"no configureExtension within {self._attach_timeout:g} s of connectExtension")))
        if self.ws.open:
            self.ws.send_texts((self._connect_frame,))

    def schedule_flush(self) -> None:
        """Write what is queued at the end of this step (once, however many frames were queued)."""
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write queued frames now, in batches, while the link is ready and the transport takes them."""
        handle = self._flush_handle
        if handle is not None:      # called at once (write_now): the flush scheduled for the step's end is moot
            self._flush_handle = None
            handle.cancel()
        outbox = self._outbox
        if not outbox or self._write_paused or self._status.state is not LinkState.READY or not self.ws.open \
                or self.ended.done():
            return
        while outbox and not self._write_paused:
            # all of it when it fits one batch (what it holds in memory bounds its frames' lengths): the usual case
            count = len(outbox) if len(outbox) <= BATCH_FRAMES and outbox.pending_bytes <= BATCH_BYTES \
                else _batch_size(outbox)
            try:
                self.ws.send_texts(itertools.islice(outbox, count) if count < len(outbox) else outbox)
            except Exception as exc:    # noqa: BLE001 - a caller may be a worker pipe's data_received: keep it
                log.exception("source %s: writing to the websocket failed; reconnecting", self._status.source_name)
                self._end(exc)          # the frames stay queued for the next socket
                return
            self._counters.writes += 1
            if count == len(outbox):
                outbox.clear()
                return
            for _ in range(count):
                outbox.popleft()
        outbox.update_room()

    def close(self, code: int, reason: str, timeout: float | None) -> None:
        """Start the closing handshake; the transport is closed if the server does not end it in time."""
        self.ws.close(code, reason)
        self._expect_close(timeout)

    def abort(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()

    def end(self, reason: BaseException) -> None:
        """End this socket now (keepalive timeout, a bug): the link reconnects."""
        self._end(reason)

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    # ---- inside --------------------------------------------------------------------------------------
    def _handshake_done(self) -> None:
        error = self.ws.handshake_error()
        if self.opened.done():
            return
        if error is not None:
            self.opened.set_exception(error)
            self.abort()
        else:
            self.opened.set_result(None)

    def _take(self, raw: bytes) -> None:
        if self._validating:
            self._take_validation(raw)
        elif len(raw) > self._limit:
            self._refuse_oversized(raw)
        else:
            frame = protocol.parse_frame(raw)
            if type(frame) is protocol.QueryFrame:
                self._take_query(frame)
            else:
                try:
                    self._dispatch(frame)
                except Exception as exc:    # noqa: BLE001 - reconnect: the link logs it
                    self._end(exc)

    def _take_query(self, frame: protocol.QueryFrame) -> None:
        self._counters.queries += 1
        try:
            self._handler.on_query(frame)
        except Exception:   # noqa: BLE001 - a failure in the handler costs neither the socket nor what follows
            log.exception("source %s: unexpected error taking query %s", self._status.source_name,
                          frame.reply_address)

    def _take_validation(self, raw: bytes) -> None:
        frame = protocol.parse_frame(raw)
        if isinstance(frame, protocol.StatusFrame):
            if self._validated is not None and not self._validated.done():
                self._validated.set_result(frame)
            self._validating = False
        else:
            log.warning("source %s: ignored %s while validating the token", self._status.source_name,
                        type(frame).__name__.removesuffix("Frame").lower() + " frame")

    def _dispatch(self, frame: protocol.Frame) -> None:
        source = self._status.source_name
        if isinstance(frame, protocol.ConfigureFrame):
            self._handler.on_configure(frame.config)
            if not self._status.ready.is_set():
                log.info("source %s: connected and configured", source)
            self._cancel_timers()
            self._status.set(LinkState.READY)
            if not self.configured.done():
                self.configured.set_result(frame.config)
            self.flush()            # what was queued while the link was down or attaching
        elif isinstance(frame, protocol.ReconnectRequiredFrame):
            log.info("source %s: the server asked for a reconnect; attaching again", source)
            self.attach()
        elif isinstance(frame, protocol.StatusFrame):
            if frame.status >= 300:
                if not self._status.ready.is_set():
                    self._end(Refused(frame.status, protocol.status_messages(frame.body)))
                    return
                log.warning("source %s: the server reported status %d: %s", source, frame.status,
                            protocol.status_messages(frame.body),
                            extra={"rate_key": f"{source}: status {frame.status}"})
        elif isinstance(frame, protocol.PublishFrame):
            log.info("source %s: ignored a publish (this source only runs queries)", source)
        elif not isinstance(frame, protocol.BadFrame):
            self._take_query(frame)     # a QueryFrame subclass, should one ever come: a query all the same
        elif frame.reply_address is not None:
            log.warning("source %s: unreadable query %s (%s); answering with an error", source,
                        frame.reply_address, frame.reason,
                        extra={"rate_key": f"{source}: unreadable query: {_reason_kind(frame.reason)}"})
            self._handler.on_unreadable_query(frame.reply_address, QueryError(
                BAD_QUERY, "The query frame could not be read: {0}", [frame.reason]))
        else:
            log.warning("source %s: skipped a frame: %s", source, _clip(frame.reason),
                        extra={"rate_key": f"{source}: bad frame: {_reason_kind(frame.reason)}"})

    def _refuse_oversized(self, raw: bytes) -> None:
        """A frame over maxMessageBytes is never parsed: its reply address is scanned for and answered
        with a 400 naming the limit; anything else is skipped."""
        size, limit, source = len(raw), self._limit, self._status.source_name
        address = protocol.sniff_reply_address(raw)
        log.warning("source %s: skipped a %d-byte frame, over maxMessageBytes (%d)%s", source, size, limit,
                    f"; answering query {address} with an error" if address else "",
                    extra={"rate_key": f"{source}: oversized frame"})
        if address is not None:
            self._handler.on_unreadable_query(address, QueryError(
                TOO_LARGE, "The query is {0} bytes, over the connector's limit of {1} bytes (maxMessageBytes "
                           "in server.config).", [size, limit]))

    def _pause_reading(self) -> None:
        if self._transport is None:
            return
        self._counters.read_pauses += 1
        self._transport.pause_reading()
        self._room_waiter = self._loop.create_task(self._release_when_room())

    async def _release_when_room(self) -> None:
        """Take held messages as the outbox makes room; read again once none is left."""
        held = self._held
        while held and not self.ended.done():
            await self._outbox.room()
            while held and not self.ended.done() and (self._outbox.has_room() or not self._status.ready.is_set()):
                self._take(held.popleft())
        self._room_waiter = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _expect_close(self, timeout: float | None = None) -> None:
        """The server is to close the TCP connection now; abort it if it does not in time."""
        self._closing = True
        if timeout is None:
            timeout = self.ws.options.close_timeout
        self._arm(timeout if timeout is not None else 10.0, self.abort)

    def _end(self, reason: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_result(reason)

    def _arm(self, delay: float, action: Callable[[], None]) -> None:
        self._cancel_timers()
        self._timer = self._loop.call_later(delay, action)

    def _cancel_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _batch_size(outbox: deque[str]) -> int:
    """How many queued frames to write at once: up to BATCH_FRAMES, BATCH_BYTES in all."""
    count = size = 0
    for frame in outbox:
        size += len(frame)
        if count == BATCH_FRAMES or (count and size > BATCH_BYTES):
            break
        count += 1
    return count


_REASON_KIND = re.compile(r"[A-Za-z .]*")


def _reason_kind(reason: str) -> str:
    """What kind of bad frame a reason describes, without its details: "unknown op 'x'" -> "unknown op"."""
    match = _REASON_KIND.match(reason)
    return (match.group(0) if match else "").strip() or "other"


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."

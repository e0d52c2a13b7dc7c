"""SourceLink: the one websocket of one source. Handshake, message loop, reconnects with capped
exponential backoff and jitter, and an ordered outbox that survives reconnects.

Only this module owns a websocket."""
from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import random
import re
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from . import compat, forkguard, protocol
from .config import ServerConfig, websocket_options
from .errors import BAD_QUERY, TOO_LARGE, AuthenticationError, QueryError
from .logqueue import rate_limit
from .logsetup import secret_pieces
from .outbox import Outbox

log = logging.getLogger(__name__)
rate_limit(log)     # warnings about bad frames carry a rate_key: a flood of them costs a few lines

HANDSHAKE_TIMEOUT = 30.0
BATCH_FRAMES = 64             # queued frames written to the socket at once
BATCH_BYTES = 256 * 1024
PING_INTERVAL = 20.0
# The websocket itself accepts frames up to this multiple of maxMessageBytes, so that a query over the limit
# is read, refused with a 400 and forgotten rather than ending the connection; past it, websockets closes
# the connection (1009) to bound memory. connectKWArgs max_size overrides it.
FRAME_CEILING_FACTOR = 4


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


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One source's handshake, for `pyexec-connector check`. outcome: connected, bad token, source
    unknown, refused, host unreachable or TLS failure."""
    outcome: str
    detail: str
    config: Any = None         # the configureExtension document the server sent (connected only)

    @property
    def ok(self) -> bool:
        return self.outcome == "connected"


class ConnectionFailed(Exception):
    """A connection attempt failed and failOnConnectionError says not to retry."""


class _Refused(Exception):
    """The server refused connectExtension (source unknown, already served...): retry later."""


class _ProtocolViolation(Exception):
    """The server said something that makes this socket unusable: reconnect."""


class Backoff:
    """Capped exponential backoff with jitter: each delay is drawn from [ceiling/2, ceiling], the ceiling
    doubling per failure up to `maximum`. Jitter keeps many connectors from reconnecting in lockstep."""

    def __init__(self, initial: float = 1.0, maximum: float = 60.0, factor: float = 2.0,
                 rng: Callable[[], float] = random.random):
        self.initial, self.maximum, self.factor, self._rng = initial, maximum, factor, rng
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * self.factor ** self.attempt)
        self.attempt += 1
        return ceiling / 2 + self._rng() * ceiling / 2

    def reset(self) -> None:
        self.attempt = 0


class _RedactFilter(logging.Filter):
    """websockets logs frames at DEBUG; the validate frame carries the token. websockets cuts long frames
    in the middle ('{"op":"validate","resourceName":"system.credent...c4d5e6f7"}'), so neither the whole
    token nor "system.credentials" need survive: look for the frame's start and for pieces of the token."""

    def __init__(self, secret: str):
        super().__init__()
        self._pieces = secret_pieces(secret)

    # equal for one secret: Logger.addFilter keeps one of them, however many links a source gets
    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RedactFilter) and frozenset(other._pieces) == frozenset(self._pieces)

    def __hash__(self) -> int:
        return hash(frozenset(self._pieces))

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record must not break logging
            return True
        if '"op":"validate"' in text or "system.cred" in text or any(p in text for p in self._pieces):
            record.msg = "(frame redacted: it carries the access token)"
            record.args = None
        return True


@dataclass(slots=True)
class LinkCounters:
    """Which path frames took (a debug figure for tests and profiling; the behaviour is the same)."""
    direct_queries: int = 0     # queries taken as websockets parsed them (compat.direct_connection)
    queued_queries: int = 0     # queries taken by the receiving task, from recv()
    declined: int = 0           # frames the direct path left to recv() (not queries, too large, outbox full)
    read_waits: int = 0         # times the receiving task waited for the outbox's room before reading
    direct_writes: int = 0      # socket writes made by write_now(), in the step the frames were queued
    writer_writes: int = 0      # socket writes made by the writer task


class SourceLink:
    """One source's websocket for the connector's whole life: handshake, message loop, reconnects, and
    the ordered outbox with its two writing paths (the writer task, and write_now() in the step frames
    were queued). Longer than ~300 lines for a reason: it is the one owner of a websocket (house rule),
    and these parts share one socket's state; websockets' internals are kept out, in compat.py."""

    def __init__(self, source_name: str, config: ServerConfig, handler: LinkHandler, *,
                 reconnect_secret: str, backoff: Backoff | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 on_state: Callable[[str, LinkState], None] | None = None):
        self.source_name = source_name
        self._config = config
        self._handler = handler
        self._secret = reconnect_secret
        self.backoff = backoff or Backoff()
        self._handshake_timeout = handshake_timeout
        self._on_state = on_state
        self.state = LinkState.IDLE
        self._outbox = Outbox(config.max_pending_bytes)     # bounded in bytes: see outbox.py
        self._has_output = asyncio.Event()
        self._ready = asyncio.Event()
        self._stopping = False
        self._ws: ClientConnection | None = None
        self._writing = False        # the writer task holds frames it has not popped yet
        self._write_now: Callable[[], int] | None = None   # see write_now()
        self.counters = LinkCounters()
        self._last_problem: str | None = None     # logged at WARNING once per change, then at DEBUG
        self.reconnects = 0          # sockets opened after the first
        self._wire_log = logging.getLogger(f"pyexec_connector.wire.{source_name}")
        self._wire_log.addFilter(_RedactFilter(config.auth_token))

    # ---- sending --------------------------------------------------------------------------
    def send(self, frame: str) -> None:
        """Queue a frame. Frames go out in the order queued, after reconnects if need be; none is dropped."""
        self._outbox.append(frame)
        self._has_output.set()

    def write_now(self) -> None:
        """Write what is queued at once, in this step, when the socket can take it: a caller that
        queued a burst of replies (a worker's answers) spares them the writer task's wake-up, one loop
        iteration of latency. Otherwise, or on any doubt, the writer task sends them as usual."""
        if self._outbox and not self._writing and self._write_now is not None and self._ready.is_set():
            try:
                written = self._write_now()
            except Exception:   # noqa: BLE001 - its caller is a worker pipe's data_received: keep that alive
                log.exception("source %s: writing queued frames at once failed; the writer sends them",
                              self.source_name)
                self._write_now = None
                return
            if written:
                self.counters.direct_writes += 1
                self._written(written)

    def break_direct_writes(self) -> None:
        """Make the next write_now() fail as a bug there would (for tests: the writer task must take over)."""
        def broken() -> int:
            raise RuntimeError("direct write broken on purpose")
        if self._write_now is not None:
            self._write_now = broken

    async def drained(self) -> None:
        """Wait while the outbox is full (maxPendingBytes): back-pressure for whoever produces frames."""
        await self._outbox.room()

    def is_drained(self) -> bool:
        """Whether drained() would return at once."""
        return self._outbox.has_room()

    @property
    def pending_frames(self) -> int:
        return len(self._outbox)

    @property
    def pending_bytes(self) -> int:
        return self._outbox.pending_bytes

    @property
    def sender_waits(self) -> int:
        return self._outbox.waits

    @property
    def peak_pending_bytes(self) -> int:
        """The most the outbox ever held, in bytes (at most about maxPendingBytes plus a frame per producer)."""
        return self._outbox.peak_bytes

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued frame went out (or the timeout). True if the outbox is empty."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._outbox and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return not self._outbox

    async def _writer(self, ws: ClientConnection) -> None:
        send_batch = compat.batch_sender(ws)
        outbox = self._outbox
        self._write_now = compat.direct_writer(ws, outbox, lambda: _batch_size(outbox), _sendable)
        try:
            while True:
                if not outbox:
                    self._has_output.clear()
                    await self._has_output.wait()
                    continue
                if not self._ready.is_set():
                    await self._ready.wait()
                    continue        # write_now() may have sent what was queued meanwhile
                count = _batch_size(outbox) if send_batch is not None else 1
                self._writing = True
                try:
                    if count > 1 and send_batch is not None:
                        await send_batch([_sendable(frame) for frame in itertools.islice(outbox, count)])
                    else:
                        await ws.send(_sendable(outbox[0]))
                finally:
                    self._writing = False
                self.counters.writer_writes += 1
                self._written(count)    # only once sent: frames cut off by a drop go out again later
        finally:
            self._write_now = None

    def _written(self, count: int) -> None:
        """`count` frames at the head of the outbox went out (from either writing path)."""
        outbox = self._outbox
        for _ in range(count):
            outbox.popleft()
        outbox.update_room()
        if not outbox:
            self._has_output.clear()

    # ---- lifecycle ------------------------------------------------------------------------
    def _set_state(self, state: LinkState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_state is not None:
                self._on_state(self.source_name, state)

    @property
    def ready(self) -> bool:
        return self.state is LinkState.READY

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def run(self) -> None:
        """Connect and serve until `close()`. Raises AuthenticationError for a refused token and
        ConnectionFailed when failOnConnectionError forbids retrying."""
        first = True
        while not self._stopping:
            if not first:
                self.reconnects += 1
            first = False
            try:
                await self._serve_one_socket()
            except AuthenticationError:
                raise
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                if self._stopping:
                    break
                if self._config.fail_on_connection_error:
                    raise ConnectionFailed(f"source {self.source_name}: connecting to "
                                           f"{self._config.websocket_url} failed: {_describe(exc)}") from None
                self._problem(f"connection to {self._config.websocket_url} failed: {_describe(exc)}")
            except _Refused as exc:
                self._problem(f"the server refused the connection: {exc} (retrying with backoff)")
            except _ProtocolViolation as exc:
                self._problem(f"{exc}; reconnecting")
            except ConnectionClosed as exc:
                if not self._stopping:
                    self._problem(f"connection closed ({_describe(exc)}); reconnecting")
            except Exception:   # a bug here must cost one socket, not the source: log it and reconnect
                if self._stopping:
                    break
                log.exception("source %s: unexpected error on the connection; reconnecting", self.source_name)
            finally:
                self._ready.clear()
                self._ws = None
            if self._stopping:
                break
            self._set_state(LinkState.BACKOFF)
            delay = self.backoff.next()
            log.info("source %s: reconnecting in %.2f s", self.source_name, delay)
            await asyncio.sleep(delay)
        self._set_state(LinkState.CLOSED)

    def _problem(self, message: str) -> None:
        """Log a failed attempt: at WARNING when it differs from the previous one, else at DEBUG, so that
        a server refusing for an hour does not fill the log."""
        level = logging.WARNING if message != self._last_problem else logging.DEBUG
        log.log(level, "source %s: %s", self.source_name, message)
        self._last_problem = message

    async def close(self, code: int = 1000, reason: str = "connector stopping") -> None:
        """Stop reconnecting and close the socket with a normal close."""
        self._stopping = True
        self._ready.clear()
        ws = self._ws
        if ws is not None:
            await ws.close(code, reason)
        self._set_state(LinkState.CLOSED)

    async def check(self) -> CheckResult:
        """One handshake (validate, connectExtension, configureExtension) and a normal close, with no
        retry: what `pyexec-connector check` reports for this source."""
        try:
            async with connect(self._config.websocket_url, **self._connect_options()) as ws:
                await self._validate(ws)
                await self._attach(ws)
                async with asyncio.timeout(self._handshake_timeout):
                    while True:
                        frame = protocol.parse_frame(await ws.recv())
                        if isinstance(frame, protocol.ConfigureFrame):
                            configuration = frame.config
                            break
                        if isinstance(frame, protocol.StatusFrame) and frame.status >= 300:
                            outcome = "source unknown" if frame.status == 404 else "refused"
                            return CheckResult(outcome, f"status {frame.status}: "
                                                        f"{protocol.status_messages(frame.body)}")
                await ws.close(1000, "check done")
            return CheckResult("connected", "validated, attached and configured", configuration)
        except AuthenticationError as exc:
            return CheckResult("bad token", str(exc))
        except ssl.SSLError as exc:
            return CheckResult("TLS failure", _describe(exc))
        except InvalidStatus as exc:
            return CheckResult("host unreachable", f"{self._config.websocket_url} is not a Vantiq websocket "
                                                   f"endpoint ({_describe(exc)})")
        except TimeoutError:
            return CheckResult("host unreachable", f"{self._config.websocket_url}: no answer within "
                                                   f"{self._handshake_timeout:g} s")
        except (OSError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
            return CheckResult("host unreachable", f"{self._config.websocket_url}: {_describe(exc)}")
        finally:
            self._set_state(LinkState.CLOSED)

    # ---- one socket -------------------------------------------------------------------------
    def _connect_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "ping_interval": PING_INTERVAL if self._config.send_pings else None,
            "ping_timeout": PING_INTERVAL,
            "max_size": self._config.max_message_bytes * FRAME_CEILING_FACTOR,
            "open_timeout": self._handshake_timeout,
            "close_timeout": 5,
            "logger": self._wire_log,
            # Replies are small JSON: permessage-deflate costs both ends more CPU than it saves on
            # the wire. connectKWArgs {"compression": "deflate"} turns it back on.
            "compression": None,
            "create_connection": compat.direct_connection(),
        }
        ssl_context = self._config.ssl_context()
        if ssl_context is not None:
            options["ssl"] = ssl_context
        options.update(websocket_options(self._config))
        return options

    async def _serve_one_socket(self) -> None:
        self._set_state(LinkState.CONNECTING)
        async with connect(self._config.websocket_url, **self._connect_options()) as ws:
            self._ws = ws
            fd = compat.socket_fd(ws)
            if fd is not None:
                forkguard.protect(fd)     # a fork of user code must never write to it
            if self._stopping:
                return
            try:
                await self._validate(ws)
                writer = asyncio.create_task(self._writer(ws), name=f"writer-{self.source_name}")
                try:
                    await self._attach(ws)
                    await self._receive(ws)
                finally:
                    writer.cancel()
                    await asyncio.gather(writer, return_exceptions=True)
            finally:
                if fd is not None:
                    forkguard.release(fd)

    async def _validate(self, ws: ClientConnection) -> None:
        await ws.send(protocol.validate_frame(self._config.auth_token))
        try:
            async with asyncio.timeout(self._handshake_timeout):
                while True:
                    frame = protocol.parse_frame(await ws.recv(decode=False))
                    if isinstance(frame, protocol.StatusFrame):
                        break
                    log.warning("source %s: ignored %s while validating the token", self.source_name,
                                _frame_kind(frame))
        except TimeoutError:
            raise TimeoutError(f"the server did not answer validate within {self._handshake_timeout:g} s "
                               "(handshake timeout)") from None
        if frame.status >= 300:
            raise AuthenticationError(f"the server at {self._config.target_server} refused the access token "
                                      f"(status {frame.status}: {protocol.status_messages(frame.body)}); "
                                      "check authToken in server.config or CONNECTOR_AUTH_TOKEN")

    async def _attach(self, ws: ClientConnection) -> None:
        self._set_state(LinkState.ATTACHING)
        self._ready.clear()
        await ws.send(protocol.connect_frame(self.source_name, self._secret))

    async def _receive(self, ws: ClientConnection) -> None:
        limit = self._config.max_message_bytes
        outbox = self._outbox
        while True:
            # bytes, not str: text frames are not decoded twice, and an oversized one is scanned as is
            if self._ready.is_set():
                # a full outbox: no more queries (their replies would grow it) until the server reads
                # again; websockets then stops reading the socket once its own small queue is full
                if not outbox.has_room():
                    self.counters.read_waits += 1
                    await self._room_or_closed(ws)
                raw = await ws.recv(decode=False)
            else:
                try:
                    async with asyncio.timeout(self._handshake_timeout):
                        raw = await ws.recv(decode=False)
                except TimeoutError:
                    raise _ProtocolViolation(f"no configureExtension within {self._handshake_timeout:g} s "
                                             "of connectExtension") from None
            if len(raw) > limit:
                self._refuse_oversized(raw, limit)
                del raw
                continue
            await self._dispatch(ws, protocol.parse_frame(raw))

    async def _room_or_closed(self, ws: ClientConnection) -> None:
        """Until the outbox has room, or the socket closed (then recv() raises, and the link reconnects:
        waiting for room alone would never end with a dead socket)."""
        room = asyncio.ensure_future(self._outbox.room())
        closed = asyncio.ensure_future(ws.wait_closed())
        try:
            await asyncio.wait((room, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            room.cancel()
            closed.cancel()

    def _take_now(self, raw: bytes) -> bool:
        """The direct path (compat.direct_connection): a message as websockets parses it, while the link
        is ready. A query within maxMessageBytes is taken here; anything else is left to _receive."""
        if len(raw) > self._config.max_message_bytes or not self._ready.is_set() or not self._outbox.has_room():
            self.counters.declined += 1     # _receive takes it, once the outbox has room
            return False
        frame = protocol.parse_frame(raw)
        if type(frame) is not protocol.QueryFrame:
            self.counters.declined += 1
            return False
        self.counters.direct_queries += 1
        self._query(frame)
        return True

    def _query(self, frame: protocol.QueryFrame) -> None:
        """Every query frame, from either path. A failure in the handler costs neither the socket nor the
        frames after it (the direct path runs inside websockets' data_received)."""
        try:
            self._handler.on_query(frame)
        except Exception:   # noqa: BLE001
            log.exception("source %s: unexpected error taking query %s", self.source_name, frame.reply_address)

    def _refuse_oversized(self, raw: bytes, limit: int) -> None:
        """A frame over maxMessageBytes is never parsed: its reply address is scanned for and answered
        with a 400 naming the limit; anything else is skipped."""
        size = len(raw)
        address = protocol.sniff_reply_address(raw)
        log.warning("source %s: skipped a %d-byte frame, over maxMessageBytes (%d)%s", self.source_name, size,
                    limit, f"; answering query {address} with an error" if address else "",
                    extra={"rate_key": f"{self.source_name}: oversized frame"})
        if address is not None:
            self._handler.on_unreadable_query(address, QueryError(
                TOO_LARGE, "The query is {0} bytes, over the connector's limit of {1} bytes (maxMessageBytes "
                           "in server.config).", [size, limit]))

    async def _dispatch(self, ws: ClientConnection, frame: protocol.Frame) -> None:
        if isinstance(frame, protocol.QueryFrame):
            self.counters.queued_queries += 1
            self._query(frame)
        elif isinstance(frame, protocol.ConfigureFrame):
            self._handler.on_configure(frame.config)
            if not self._ready.is_set():
                log.info("source %s: connected and configured", self.source_name)
            self.backoff.reset()
            self._last_problem = None
            self._set_state(LinkState.READY)
            self._ready.set()
            if compat.can_take_directly(ws):
                ws.on_message = self._take_now    # type: ignore[attr-defined]
        elif isinstance(frame, protocol.ReconnectRequiredFrame):
            log.info("source %s: the server asked for a reconnect; attaching again", self.source_name)
            await self._attach(ws)
        elif isinstance(frame, protocol.StatusFrame):
            if frame.status >= 300:
                if not self._ready.is_set():
                    raise _Refused(f"status {frame.status}: {protocol.status_messages(frame.body)}")
                log.warning("source %s: the server reported status %d: %s", self.source_name, frame.status,
                            protocol.status_messages(frame.body),
                            extra={"rate_key": f"{self.source_name}: status {frame.status}"})
        elif isinstance(frame, protocol.PublishFrame):
            log.info("source %s: ignored a publish (this source only runs queries)", self.source_name)
        elif frame.reply_address is not None:
            log.warning("source %s: unreadable query %s (%s); answering with an error", self.source_name,
                        frame.reply_address, frame.reason,
                        extra={"rate_key": f"{self.source_name}: unreadable query: {_reason_kind(frame.reason)}"})
            self._handler.on_unreadable_query(frame.reply_address, QueryError(
                BAD_QUERY, "The query frame could not be read: {0}", [frame.reason]))
        else:
            log.warning("source %s: skipped a frame: %s", self.source_name, _clip(frame.reason),
                        extra={"rate_key": f"{self.source_name}: bad frame: {_reason_kind(frame.reason)}"})


def _batch_size(outbox: deque[str]) -> int:
    """How many queued frames to write at once: up to BATCH_FRAMES, BATCH_BYTES in all."""
    count = size = 0
    for frame in outbox:
        size += len(frame)
        if count == BATCH_FRAMES or (count and size > BATCH_BYTES):
            break
        count += 1
    return count


def _frame_kind(frame: protocol.Frame) -> str:
    return type(frame).__name__.removesuffix("Frame").lower() + " frame"


def _sendable(frame: str) -> str:
    """The frame as text UTF-8 can carry. A lone surrogate (user data such as chr(0xD800)) cannot be encoded,
    and websockets would fail the whole connection on it, again after every reconnect; in a JSON frame it
    can only sit inside a string, where its \\uXXXX escape means the same."""
    if frame.isascii():
        return frame
    try:
        frame.encode("utf-8")
    except UnicodeEncodeError:
        return frame.encode("utf-8", "backslashreplace").decode("utf-8")
    return frame


_REASON_KIND = re.compile(r"[A-Za-z .]*")


def _reason_kind(reason: str) -> str:
    """What kind of bad frame a reason describes, without its details: "unknown op 'x'" -> "unknown op"."""
    match = _REASON_KIND.match(reason)
    return (match.group(0) if match else "").strip() or "other"


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS certificate verification failed ({exc.verify_message or exc.reason}): the server's "
                "certificate is not trusted; give its CA with connectKWArgs {\"caFile\": \"/path/ca.pem\"} "
                "(or, for testing only, {\"disableSslVerification\": true})")
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__




"""SourceLink: the one websocket of one source, for the connector's whole life. It opens sockets
(linksocket.py, on websockets' sans-I/O protocol), reconnects with capped exponential backoff and
jitter, and keeps the ordered outbox that survives reconnects.

Only this module and those it drives (linksocket.py, websocket.py, dial.py) touch a websocket."""
from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from . import forkguard, protocol
from .config import ServerConfig, websocket_options
from .dial import dial
from .errors import AuthenticationError
from .linksocket import LinkCounters, LinkHandler, LinkSocket, LinkState, LinkStatus, ProtocolViolation, Refused
from .logqueue import rate_limit
from .logsetup import secret_pieces
from .outbox import Outbox
from .websocket import ClientWebSocket, SocketOptions

__all__ = ["Backoff", "CheckResult", "ConnectionFailed", "LinkCounters", "LinkHandler", "LinkState", "SourceLink"]

log = logging.getLogger(__name__)
rate_limit(log)     # warnings about bad frames carry a rate_key: a flood of them costs a few lines

HANDSHAKE_TIMEOUT = 30.0
PING_INTERVAL = 20.0
CLOSE_TIMEOUT = 5.0
# The websocket itself accepts frames up to this multiple of maxMessageBytes, so that a query over the limit
# is read, refused with a 400 and forgotten rather than ending the connection; past it, websockets closes
# the connection (1009) to bound memory. connectKWArgs max_size overrides it.
FRAME_CEILING_FACTOR = 4


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


class SourceLink:
    """One source's websocket for the connector's whole life: sockets opened one after the other
    (`run`), the outbox frames wait in until a socket is ready, and `check` for the console command."""

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
        self._status = LinkStatus(source_name, on_state, self.backoff)
        self._outbox = Outbox(config.max_pending_bytes)     # bounded in bytes: see outbox.py
        self._writing_soon = False      # write_soon(): a write_now() comes before this step ends
        self._stopping = False
        self._socket: LinkSocket | None = None
        self.counters = LinkCounters()
        self.reconnects = 0          # sockets opened after the first
        self._wire_log = logging.getLogger(f"pyexec_connector.wire.{source_name}")
        self._wire_log.addFilter(_RedactFilter(config.auth_token))
        self._options = socket_options(config, handshake_timeout)

    # ---- sending --------------------------------------------------------------------------
    def send(self, frame: str) -> None:
        """Queue a frame. Frames go out in the order queued, after reconnects if need be; none is dropped.
        Those queued in one step are written together at its end."""
        self._outbox.append(frame)
        sock = self._socket
        if sock is not None and not self._writing_soon:
            sock.schedule_flush()

    def write_soon(self) -> None:
        """The caller calls write_now() before its step ends (whatever happens): what it queues meanwhile
        schedules no write for the step's end, which write_now() would only cancel."""
        self._writing_soon = True

    def write_now(self) -> None:
        """Write what is queued at once, in this step, when the socket can take it: a caller that queued
        a burst (a worker's answers) spares them the wait for the step's end."""
        self._writing_soon = False
        sock = self._socket
        if sock is not None and self._outbox:
            sock.flush()

    async def drained(self) -> None:
        """Wait while the outbox is full (maxPendingBytes): back-pressure for whoever produces frames."""
        await self._outbox.room()

    def is_drained(self) -> bool:
        """Whether drained() would return at once."""
        return self._outbox.not_full

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

    # ---- lifecycle ------------------------------------------------------------------------
    @property
    def state(self) -> LinkState:
        return self._status.state

    @property
    def ready(self) -> bool:
        return self._status.state is LinkState.READY

    async def wait_ready(self) -> None:
        await self._status.ready.wait()

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
            except Refused as exc:
                self._problem(f"the server refused the connection: {exc} (retrying with backoff)")
            except ProtocolViolation as exc:
                self._problem(f"{exc}; reconnecting")
            except ConnectionClosed as exc:
                if not self._stopping:
                    self._problem(f"connection closed ({_describe(exc)}); reconnecting")
            except Exception:   # a bug here must cost one socket, not the source: log it and reconnect
                if self._stopping:
                    break
                log.exception("source %s: unexpected error on the connection; reconnecting", self.source_name)
            if self._stopping:
                break
            self._status.set(LinkState.BACKOFF)
            delay = self.backoff.next()
            log.info("source %s: reconnecting in %.2f s", self.source_name, delay)
            await asyncio.sleep(delay)
        self._status.set(LinkState.CLOSED)

    def _problem(self, message: str) -> None:
        """Log a failed attempt: at WARNING when it differs from the previous one, else at DEBUG, so that
        a server refusing for an hour does not fill the log."""
        level = logging.WARNING if message != self._status.last_problem else logging.DEBUG
        log.log(level, "source %s: %s", self.source_name, message)
        self._status.last_problem = message

    async def close(self, code: int = 1000, reason: str = "connector stopping") -> None:
        """Stop reconnecting and close the socket with a normal close."""
        self._stopping = True
        sock = self._socket
        self._status.set(LinkState.CLOSED)
        if sock is not None:
            await self._shut(sock, code, reason)

    async def check(self) -> CheckResult:
        """One handshake (validate, connectExtension, configureExtension) and a normal close, with no
        retry: what `pyexec-connector check` reports for this source."""
        sock: LinkSocket | None = None
        try:
            sock = await self._open()
            await self._validate(sock)
            sock.attach()
            async with asyncio.timeout(self._handshake_timeout):
                await asyncio.wait((sock.configured, sock.ended), return_when=asyncio.FIRST_COMPLETED)
            if sock.configured.done() and not sock.configured.exception():
                return CheckResult("connected", "validated, attached and configured", sock.configured.result())
            reason = sock.ended.result() if sock.ended.done() else TimeoutError()
            if isinstance(reason, Refused):
                return CheckResult("source unknown" if reason.status == 404 else "refused", str(reason))
            raise reason
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
        except (OSError, InvalidHandshake, InvalidURI, ConnectionClosed, ProtocolViolation) as exc:
            return CheckResult("host unreachable", f"{self._config.websocket_url}: {_describe(exc)}")
        finally:
            if sock is not None:
                await self._shut(sock, 1000, "check done")
            self._status.set(LinkState.CLOSED)

    # ---- one socket -------------------------------------------------------------------------
    async def _open(self) -> LinkSocket:
        """A socket past its opening handshake (TCP, TLS, proxy, HTTP upgrade within open_timeout)."""
        self._status.set(LinkState.CONNECTING)
        options = self._options
        ws = ClientWebSocket(self._config.websocket_url, options, self._wire_log)
        sock = LinkSocket(ws, self._outbox, self._handler, self._status, self.counters,
                          max_message_bytes=self._config.max_message_bytes,
                          attach_timeout=self._handshake_timeout,
                          connect_frame=protocol.connect_frame(self.source_name, self._secret))
        try:
            async with asyncio.timeout(options.open_timeout):
                await dial(lambda: sock, ws.uri, options)
                await sock.opened
        except BaseException:
            sock.abort()
            raise
        return sock

    async def _serve_one_socket(self) -> None:
        sock = await self._open()
        transport = sock.transport
        raw = transport.get_extra_info("socket") if transport is not None else None
        fd = raw.fileno() if raw is not None else None
        if fd is not None:
            forkguard.protect(fd)     # a fork of user code must never write to it
        self._socket = sock
        keepalive = None
        try:
            if self._stopping:
                return
            await self._validate(sock)
            sock.attach()
            if self._options.ping_interval is not None:
                keepalive = asyncio.create_task(self._keepalive(sock), name=f"keepalive-{self.source_name}")
            raise await sock.ended
        finally:
            self._socket = None
            if keepalive is not None:
                keepalive.cancel()
            if not self._stopping:
                self._status.set(LinkState.CONNECTING)      # not ready: frames wait for the next socket
            await self._shut(sock, 1000, "reconnecting")
            if fd is not None:
                forkguard.release(fd)

    async def _validate(self, sock: LinkSocket) -> None:
        try:
            frame = await sock.validate(protocol.validate_frame(self._config.auth_token), self._handshake_timeout)
        except TimeoutError:
            raise TimeoutError(f"the server did not answer validate within {self._handshake_timeout:g} s "
                               "(handshake timeout)") from None
        if frame.status >= 300:
            raise AuthenticationError(f"the server at {self._config.target_server} refused the access token "
                                      f"(status {frame.status}: {protocol.status_messages(frame.body)}); "
                                      "check authToken in server.config or CONNECTOR_AUTH_TOKEN")

    async def _keepalive(self, sock: LinkSocket) -> None:
        """A ping every ping_interval; no pong within ping_timeout ends the socket (the link reconnects)."""
        interval, timeout = self._options.ping_interval or PING_INTERVAL, self._options.ping_timeout
        ws = sock.ws
        while True:
            await asyncio.sleep(interval)
            if not ws.open:
                return
            ws.ping()
            if timeout is None:
                continue
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not ws.pong_received and loop.time() < deadline:
                await asyncio.sleep(min(0.05, timeout))
            if not ws.pong_received:
                ws.fail(1011, "keepalive ping timeout")
                sock.end(ProtocolViolation(f"no pong within {timeout:g} s of a ping (ping_timeout)"))
                return

    async def _shut(self, sock: LinkSocket, code: int, reason: str) -> None:
        """Close the socket (a closing handshake bounded by close_timeout), and wait until it is closed."""
        sock.close(code, reason, self._options.close_timeout)
        try:
            async with asyncio.timeout((self._options.close_timeout or CLOSE_TIMEOUT) + 1):
                await asyncio.shield(sock.lost)
        except TimeoutError:
            sock.abort()


def socket_options(config: ServerConfig, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> SocketOptions:
    """The link's websocket options: the connector's defaults, then connectKWArgs over them."""
    given = websocket_options(config)
    if "max_queue" in given:
        log.info("connectKWArgs.max_queue has no effect: the link takes each message as it arrives and "
                 "stops reading while its outbox is full (maxPendingBytes)")
        given.pop("max_queue")
    named = {name: given.pop(name) for name in list(given) if name in SocketOptions.__dataclass_fields__}
    defaults: dict[str, Any] = {
        "max_size": config.max_message_bytes * FRAME_CEILING_FACTOR,
        "open_timeout": handshake_timeout,
        "close_timeout": CLOSE_TIMEOUT,
        "ping_interval": PING_INTERVAL if config.send_pings else None,
        "ping_timeout": PING_INTERVAL,
        # Replies are small JSON: permessage-deflate costs both ends more CPU than it saves on
        # the wire. connectKWArgs {"compression": "deflate"} turns it back on.
        "compression": None,
        "ssl": config.ssl_context(),
    }
    defaults.update(named)
    return SocketOptions(connection=given, **defaults)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS certificate verification failed ({exc.verify_message or exc.reason}): the server's "
                "certificate is not trusted; give its CA with connectKWArgs {\"caFile\": \"/path/ca.pem\"} "
                "(or, for testing only, {\"disableSslVerification\": true})")
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__




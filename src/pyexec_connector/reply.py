"""One query's reply channel: at most one terminal reply, whoever tries to send it."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from . import errors, protocol
from .errors import QueryError

log = logging.getLogger(__name__)


class ConnectorAPIError(RuntimeError):
    """Misuse of connector_connection by user code (bad status code, missing body, bad context)."""


class QueryContext(dict):
    """`connector_context`: the dict upstream scripts receive (source_name, response_address), carrying
    the channel its replies go through."""

    # No __init__ of its own: one is made per query, by dict's (ReplyChannel.context sets the channel).
    __slots__ = ("channel",)
    channel: ReplyChannel | None

    def __reduce__(self):  # a context pickled into a worker travels without its channel
        return (_unpickled_context, (self["source_name"], self["response_address"]))


def _unpickled_context(source_name: str, reply_address: str) -> QueryContext:
    context = QueryContext(source_name=source_name, response_address=reply_address)
    context.channel = None
    return context


class ReplyChannel:
    """Sends one query's replies through `send` (the link's ordered outbox). After the first terminal
    reply (200, 204 or an error) everything else for this query is dropped and logged."""

    __slots__ = ("reply_address", "source_name", "_send", "terminated", "_done", "status", "error_code",
                 "max_bytes", "started")

    def __init__(self, send: Callable[[str], None], reply_address: str, source_name: str,
                 max_bytes: int | None = None):
        self._send = send
        self.max_bytes = max_bytes         # maxMessageBytes: a larger frame would kill the link, again and again
        self.reply_address = reply_address
        self.source_name = source_name
        self.terminated = False
        self.status: int | None = None       # the terminal status sent, for logs and metrics
        self.error_code: str | None = None   # the messageCode of the terminal error, for logs and metrics
        self._done: asyncio.Future | None = None
        self.started = 0.0                   # perf_counter() when the query came (Pipeline.begin)

    @property
    def context(self) -> QueryContext:
        """`connector_context` for code run with this channel (a run asks once). Made at each use, not kept:
        a channel holding its context would make a reference cycle per query, which only the collector
        frees (a query relayed to a worker process never needs the connector's either)."""
        context = QueryContext(source_name=self.source_name, response_address=self.reply_address)
        context.channel = self
        return context

    def _emit(self, frame: str, terminal: bool, status: int) -> bool:
        if self.terminated:
            log.warning("source %s: reply %d for %s dropped: the query was already answered",
                        self.source_name, status, self.reply_address)
            return False
        if terminal:
            self.terminated = True
            self.status = status
            if self._done is not None and not self._done.done():
                self._done.set_result(status)
        self._deliver(frame, terminal, status)
        return True

    def _deliver(self, frame: str, terminal: bool, status: int) -> None:
        """Where an accepted frame goes (a worker process overrides this to reach the connector)."""
        self._send(frame)

    def forward(self, frame: str, terminal: bool, status: int, error_code: str | None = None) -> bool:
        """A frame some other channel already built and checked (a worker's): the same once-only rule."""
        max_bytes = self.max_bytes      # oversize() only when the frame might be: it is on every reply's path
        size = oversize(frame, max_bytes) if max_bytes is not None and len(frame) * 4 > max_bytes else 0
        if size:   # the worker checks too; this keeps an oversized frame out of the outbox whatever happens
            return self.error(QueryError(errors.TOO_LARGE, "A reply of {0} bytes is over the connector's limit of "
                                         "{1} bytes (maxMessageBytes).", [size, self.max_bytes]))
        if error_code is not None and not self.terminated:
            self.error_code = error_code
        return self._emit(frame, terminal, status)

    def send(self, status: int, body: Any = None) -> bool:
        """A query response as upstream's send_query_response: 100 partial, 200 last, 204 empty."""
        if status not in protocol.QUERY_RESPONSE_CODES:
            raise ConnectorAPIError(f"send_query_response: status must be 100, 200 or 204, not {status!r}")
        if status != protocol.STATUS_EMPTY and body is None:
            raise ConnectorAPIError("send_query_response: a 100 or 200 reply needs a body (a dict or list)")
        frame = protocol.reply_frame(self.reply_address, status, body)
        size = oversize(frame, self.max_bytes)
        if size:
            raise ConnectorAPIError(f"send_query_response: the reply is {size} bytes, over maxMessageBytes "
                                    f"({self.max_bytes})")
        return self._emit(frame, status != protocol.STATUS_PARTIAL, status)

    def complete_raw(self, body_json: str) -> bool:
        """The 200 reply with a body already encoded as JSON text."""
        frame = protocol.reply_frame_raw(self.reply_address, protocol.STATUS_COMPLETE, body_json)
        size = oversize(frame, self.max_bytes)
        if size:
            return self.error(QueryError(errors.TOO_LARGE, "The results are {0} bytes, over the connector's limit "
                                         "of {1} bytes (maxMessageBytes); use limitReturnTo or codeHandlesReturn "
                                         "to send less.", [size, self.max_bytes]))
        return self._emit(frame, True, protocol.STATUS_COMPLETE)

    def error(self, error: QueryError) -> bool:
        if not self.terminated:
            self.error_code = error.code
        frame = protocol.error_frame(self.reply_address, error)
        size = oversize(frame, self.max_bytes)
        if size:   # e.g. a traceback quoting a huge value: the code and the size still reach the caller
            frame = protocol.error_frame(self.reply_address, QueryError(
                error.code, "The error message was {0} bytes, over maxMessageBytes ({1}); see the connector's "
                            "log.", [size, self.max_bytes]))
            log.warning("source %s: error reply for %s was too large to send: %s", self.source_name,
                        self.reply_address, error.message()[:2000])
        return self._emit(frame, True, protocol.STATUS_ERROR)

    def done_future(self) -> asyncio.Future:
        """Resolves when the terminal reply has been sent."""
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
            if self.terminated:
                self._done.set_result(self.status)
        return self._done


def oversize(frame: str, max_bytes: int | None) -> int:
    """The frame's size in bytes when it exceeds `max_bytes`, else 0. Encodes only when it might."""
    if max_bytes is None or len(frame) * 4 <= max_bytes:    # UTF-8 needs at most 4 bytes a character
        return 0
    size = len(frame) if frame.isascii() else len(frame.encode("utf-8", "surrogatepass"))
    return size if size > max_bytes else 0


def notification_builder(source_name: str, max_bytes: int | None) -> Callable[[Any], str]:
    """The notification frame for `send_notification`, refused (ConnectorAPIError) over `max_bytes`."""

    def build(obj: Any) -> str:
        frame = protocol.notification_frame(source_name, obj)
        size = oversize(frame, max_bytes)
        if size:
            raise ConnectorAPIError(f"send_notification: the notification is {size} bytes, over maxMessageBytes "
                                    f"({max_bytes})")
        return frame

    return build

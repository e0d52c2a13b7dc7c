"""A loopback stand-in of the Vantiq server side, for `demo`, tests and benchmarks.

It speaks the server half of the extension-source protocol over a real websocket (aiohttp) and serves
the two document endpoints with bearer-token checks. Knobs let tests inject faults:

- `drop(source)` closes the socket mid-stream (close frame; `abrupt=True` cuts TCP instead);
- `close_during_handshake("validate" | "connectExtension", times)` cuts the next sockets at that step;
- `request_reconnect(source)` sends reconnectRequired; `refuse(...)` / `accept(...)` answer connectExtension;
- `silent_validate = True` never answers validate; `answer_pings = False` leaves pings unanswered;
- `put_document(..., content_size=, incomplete=, fault="error" | "hang")` for the document endpoints;
- `send_raw(source, data)` sends any text or bytes; `start(ssl=context)` serves wss/https;
- `pause_reading()` / `resume_reading()`: a slow server that stops reading its sockets (what the connector
  sends backs up in TCP, then in the connector), and picks up where it stopped."""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import ssl
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from aiohttp import WSMsgType, web


def _loads(data: str | bytes) -> Any:
    """A frame from a connector: orjson first (the bench's client reads 50 KB replies: it must not be
    what limits the q/s it measures), json for what orjson refuses (a bare NaN, as upstream writes for a
    NaN float, lone surrogates, integers beyond 64 bits)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


log = logging.getLogger(__name__)
WS_PATH = "/api/v1/wsock/websocket"


def _frame_of(data: str | bytes) -> dict[str, Any] | None:
    """A frame the connector sent, or None for one that is not a JSON object."""
    try:
        frame = _loads(data)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) else None


async def _send_close_frame(ws: web.WebSocketResponse) -> None:
    """Close 1011, still reading what the client sends until its own close."""
    writer = getattr(ws, "_writer", None)
    if writer is None:   # not the aiohttp we know: a plain close (it discards frames arriving after it)
        await ws.close(code=1011, message=b"dropped by devserver")
    else:
        # aiohttp's own close() would drop whatever the client sends before it answers the close; send
        # the close frame alone and let the socket's reader handle the rest up to the client's close.
        await writer.close(1011, b"dropped by devserver")


_VALIDATED = {"status": 200, "body": {"username": "dev", "namespace": "dev"}}
_INVALID_TOKEN = {"status": 401, "body": [{"code": "io.vantiq.authentication.failed",
                                           "message": "Invalid access token.", "params": []}]}
_NOT_VALIDATED = {"status": 401, "body": [{"code": "io.vantiq.not.authenticated", "message": "Validate first.",
                                           "params": []}]}


@dataclass
class QueryResult:
    """Every reply a query received, in order; the last one is terminal."""
    replies: list[dict[str, Any]]

    @property
    def status(self) -> int:
        return self.replies[-1]["status"]

    @property
    def body(self) -> Any:
        return self.replies[-1].get("body")

    @property
    def results(self) -> dict[str, Any]:
        return self.body["pythonCallResults"]

    @property
    def error_code(self) -> str | None:
        body = self.body
        return body.get("messageCode") if self.status >= 300 and isinstance(body, dict) else None


@dataclass
class Document:
    name: str
    content: bytes
    modified: str
    incomplete: bool = False
    content_size: int | None = None   # what the metadata claims; None: the true size
    fault: DocumentFault | None = None   # how the content endpoint misbehaves


DocumentFault = Literal["error", "hang"]    # HTTP 500 with a plain-text body | never answer
HandshakeStage = Literal["validate", "connectExtension"]


@dataclass
class _SourceState:
    config: dict[str, Any] = field(default_factory=lambda: {"pythonExecConfig": {"general": {}}})
    ws: web.WebSocketResponse | None = None
    attached: asyncio.Event = field(default_factory=asyncio.Event)
    connects: int = 0           # connectExtension frames received
    refusal: tuple[int, str, str] | None = None   # (status, code, message) answered to connectExtension


@dataclass(frozen=True)
class Upgrade:
    """One websocket's opening handshake: the request's headers, and whether permessage-deflate was agreed."""
    headers: dict[str, str]
    compressed: bool


class ReplyBook:
    """Where replies go: to a sink (`route`, the benchmarks' lean path), to a queue a test reads
    (`expect`), or, for an address nobody waits for, to `stray` (a second terminal reply shows there)."""

    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue] = {}
        self._routes: dict[str, Callable[[dict[str, Any]], None]] = {}
        self.stray: list[dict[str, Any]] = []

    def expect(self, address: str) -> str:
        self._queues[address] = asyncio.Queue()
        return address

    def forget(self, address: str) -> None:
        self._queues.pop(address, None)

    def received(self, address: str) -> int:
        return self._queues[address].qsize()

    def route(self, address: str, sink: Callable[[dict[str, Any]], None]) -> None:
        self._routes[address] = sink

    def deliver(self, frame: dict[str, Any]) -> None:
        address = frame["headers"].get("X-Reply-Address")
        sink = self._routes.get(address)
        if sink is not None:
            if frame.get("status") != 100:
                del self._routes[address]
            sink(frame)
            return
        queue = self._queues.get(address)
        if queue is None:
            self.stray.append(frame)
        else:
            queue.put_nowait(frame)

    async def replies_for(self, address: str) -> QueryResult:
        """Every reply to `address` up to its terminal one (the caller bounds the wait)."""
        queue = self._queues[address]
        replies: list[dict[str, Any]] = []
        while True:
            reply = await queue.get()
            replies.append(reply)
            if reply.get("status") != 100:
                break
        del self._queues[address]
        return QueryResult(replies)


class DocumentStore:
    """The two document endpoints (metadata, then content), with bearer-token checks and fault knobs."""

    def __init__(self, token: Callable[[], str], stopping: asyncio.Event):
        self._token = token
        self._stopping = stopping
        self.documents: dict[str, Document] = {}
        self.requests: list[str] = []

    def put(self, doc: Document) -> Document:
        self.documents[doc.name] = doc
        return doc

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self._token()}"

    async def meta(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.requests.append(f"meta:{name}")
        if not self._authorised(request):
            return web.json_response([{"code": "io.vantiq.authentication.failed",
                                       "message": "Invalid access token.", "params": []}], status=401)
        doc = self.documents.get(name)
        if doc is None:
            return web.json_response([{"code": "io.vantiq.resource.not.found",
                                       "message": f"The requested instance ('{name}') of the documents "
                                                  "resource could not be found.", "params": [name]}], status=404)
        size = doc.content_size if doc.content_size is not None else len(doc.content)
        return web.json_response({"name": name, "contentSize": size, "isIncomplete": doc.incomplete,
                                  "content": f"/docs/{name}", "fileType": "text/x-python",
                                  "ars_createdAt": doc.modified, "ars_modifiedAt": doc.modified})

    async def content(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.requests.append(f"content:{name}")
        if not self._authorised(request):
            return web.Response(status=401)
        doc = self.documents.get(name)
        if doc is None:
            return web.Response(status=404)
        if doc.fault == "error":
            return web.Response(status=500, text="Internal Server Error")
        if doc.fault == "hang":
            await self._stopping.wait()     # until the client gives up, or the server stops
        return web.Response(body=doc.content, content_type="text/x-python")


class DevServer:
    """The stand-in server (see the module docstring): every fault knob and every public method tests use
    instead of its privates lives here, so that tests and benchmarks have one surface to learn; where replies
    go is the ReplyBook's, the document endpoints are the DocumentStore's."""

    def __init__(self, *, token: str = "dev-token", sources: tuple[str, ...] = ("pythonSource",),
                 max_message_bytes: int = 256 * 1024 * 1024):
        self.token = token
        self._sources: dict[str, _SourceState] = {name: _SourceState() for name in sources}
        self.notifications: dict[str, list[Any]] = defaultdict(list)
        self._notified = asyncio.Condition()
        self._replies = ReplyBook()
        self._addresses = itertools.count(1)
        self.validations = 0
        self.stray_replies = self._replies.stray   # replies to addresses nobody waits for
        self.bad_frames = 0
        self.close_codes: list[int | None] = []   # how each websocket ended (1000: a normal close)
        self.upgrades: list[Upgrade] = []         # each websocket's opening handshake, as the server saw it
        self.silent_validate = False     # knob: accept the socket but never answer validate
        self.answer_pings = True         # knob: False leaves the connector's websocket pings unanswered
        self.configure_delay = 0.0       # knob: seconds between connectExtension and its configureExtension
        self.pings = 0                   # pings received from connectors
        self._close_during: dict[str, int] = {}   # handshake stage -> sockets still to close at it
        self._ssl: ssl.SSLContext | None = None
        self._requests: dict[web.WebSocketResponse, web.Request] = {}
        self._stopping = asyncio.Event()
        self._documents = DocumentStore(lambda: self.token, self._stopping)
        self.documents = self._documents.documents
        self.document_requests = self._documents.requests
        self._max = max_message_bytes
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self._reading = asyncio.Event()    # cleared by pause_reading()
        self._reading.set()
        self.port: int | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0, *, ssl: ssl.SSLContext | None = None) -> str:
        """Listen on a free loopback port (or `port`); with `ssl`, speak TLS (wss/https). Returns the URL."""
        self._ssl = ssl
        app = web.Application(client_max_size=self._max)
        app.router.add_get(WS_PATH, self._websocket)
        app.router.add_get("/api/v1/resources/documents/{name:.+}", self._documents.meta)
        app.router.add_get("/docs/{name:.+}", self._documents.content)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.url

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl is not None else 'http'}://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self._stopping.set()
        self._reading.set()
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DevServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- what tests and the demo call --------------------------------------------------------
    def source(self, name: str) -> _SourceState:
        return self._sources.setdefault(name, _SourceState())

    def set_source_config(self, source: str, general: dict[str, Any] | None = None, *,
                          document: Any = None) -> None:
        self.source(source).config = document if document is not None else {"pythonExecConfig": {
            "general": general or {}}}

    def refuse(self, source: str, status: int = 404, code: str = "io.vantiq.resource.not.found",
               message: str = "The source {0} does not exist.") -> None:
        self.source(source).refusal = (status, code, message)

    def accept(self, source: str) -> None:
        self.source(source).refusal = None

    def put_document(self, name: str, text: str | bytes, *, modified: str | None = None,
                     incomplete: bool = False, content_size: int | None = None,
                     fault: DocumentFault | None = None) -> Document:
        content = text.encode() if isinstance(text, str) else text
        stamp = modified or datetime.now(UTC).isoformat(timespec="microseconds")
        return self._documents.put(Document(name, content, stamp, incomplete, content_size, fault))

    def pause_reading(self) -> None:
        """Stop reading every socket (new ones too) until resume_reading(). Nothing is lost: aiohttp's own
        flow control stops taking data from TCP, so the connector's writes back up as with a slow server.
        Pings wait too: keep the pause shorter than the connector's ping timeout, or sendPings off."""
        self._reading.clear()

    def resume_reading(self) -> None:
        """Read again, from where reading stopped."""
        self._reading.set()

    @property
    def reading(self) -> bool:
        return self._reading.is_set()

    async def wait_attached(self, source: str = "pythonSource", timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self.source(source).attached.wait()

    def attached(self, source: str = "pythonSource") -> bool:
        return self.source(source).attached.is_set()

    def connects(self, source: str = "pythonSource") -> int:
        return self.source(source).connects

    def expect(self, address: str) -> str:
        """Collect the replies to `address` (for a query frame sent with `send_raw`); returns it."""
        return self._replies.expect(address)

    def forget(self, address: str) -> None:
        """Stop collecting replies to `address` (later ones count as stray)."""
        self._replies.forget(address)

    def received(self, address: str) -> int:
        """Replies to `address` received and not yet taken by `replies_for`."""
        return self._replies.received(address)

    async def wait_received(self, address: str, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until `count` replies to `address` were received (leaving them to `replies_for`)."""
        async with asyncio.timeout(timeout):
            while self._replies.received(address) < count:
                await asyncio.sleep(0.01)

    async def send_query(self, source: str, params: Any, *, address: str | None = None) -> str:
        """Send a query frame; returns its reply address (collect replies with `replies_for`)."""
        address = self.expect(address or f"reply-{next(self._addresses)}")
        await self.send_frame(source, {"op": "query", "resourceName": "sources", "resourceId": source,
                                       "object": params, "messageHeaders": {"REPLY_ADDR_HEADER": address}})
        return address

    def route_replies(self, address: str, sink: Callable[[dict[str, Any]], None]) -> None:
        """Call `sink(frame)` for each reply to `address`, until its terminal one: the lean path for
        benchmarks (pair it with `send_raw`), without a queue and a waiting task per query."""
        self._replies.route(address, sink)

    async def replies_for(self, address: str, timeout: float = 10.0) -> QueryResult:
        async with asyncio.timeout(timeout):
            return await self._replies.replies_for(address)

    async def query(self, params: Any, source: str = "pythonSource", timeout: float = 10.0) -> QueryResult:
        """A VAIL SELECT ... FROM SOURCE source WITH params, as the server sends it; all its replies."""
        address = await self.send_query(source, params)
        return await self.replies_for(address, timeout)

    async def send_frame(self, source: str, frame: Any) -> None:
        await self.send_raw(source, json.dumps(frame))

    async def send_raw(self, source: str, data: str | bytes) -> None:
        ws = await self._socket(source)
        if isinstance(data, bytes):
            await ws.send_bytes(data)
        else:
            await ws.send_str(data)

    async def request_reconnect(self, source: str = "pythonSource") -> None:
        """Send reconnectRequired on the live socket."""
        state = self.source(source)
        state.attached.clear()
        await self.send_frame(source, {"op": "reconnectRequired", "resourceName": "sources", "resourceId": source})

    async def reconfigure(self, source: str, general: dict[str, Any]) -> None:
        self.set_source_config(source, general)
        await self._send_configure(source, await self._socket(source))

    async def drop(self, source: str = "pythonSource", *, abrupt: bool = False) -> None:
        """Close the source's socket mid-stream, as a failing server or proxy would.

        By default with a close frame (1011): frames the connector sent before it saw the close are still
        read and handled, as a real server handles what it received. `abrupt=True` cuts the TCP connection
        with no close frame: frames in flight at that instant are lost, as they would be on a real network."""
        state = self.source(source)
        ws = state.ws
        state.attached.clear()
        state.ws = None
        if ws is None:
            return
        if abrupt:
            self._abort(ws)
        else:
            await _send_close_frame(ws)

    def close_during_handshake(self, stage: HandshakeStage, times: int = 1) -> None:
        """Cut the next `times` sockets when they send `stage` (validate or connectExtension), unanswered."""
        self._close_during[stage] = times

    def _abort(self, ws: web.WebSocketResponse) -> None:
        request = self._requests.get(ws)
        if request is not None and request.transport is not None:
            request.transport.abort()

    async def wait_notifications(self, source: str, count: int, timeout: float = 10.0) -> list[Any]:
        async with asyncio.timeout(timeout):
            async with self._notified:
                await self._notified.wait_for(lambda: len(self.notifications[source]) >= count)
        return self.notifications[source]

    async def _socket(self, source: str, timeout: float = 10.0) -> web.WebSocketResponse:
        state = self.source(source)
        async with asyncio.timeout(timeout):
            while state.ws is None:
                await asyncio.sleep(0.01)
        return state.ws

    # ---- the server side of the protocol ------------------------------------------------------
    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=self._max, autoping=False)   # pings answered below, or not
        await ws.prepare(request)
        self.upgrades.append(Upgrade(dict(request.headers), bool(ws.compress)))
        self._sockets.add(ws)
        self._requests[ws] = request
        validated = False
        try:
            async for msg in ws:
                if not self._reading.is_set():
                    await self._reading.wait()
                if msg.type is WSMsgType.PING:
                    self.pings += 1
                    if self.answer_pings:
                        await ws.pong(msg.data)
                    continue
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                frame = _frame_of(msg.data)
                if frame is None:
                    self.bad_frames += 1
                    continue
                op = frame.get("op")
                if isinstance(op, str) and self._close_during.get(op, 0) > 0:
                    self._close_during[op] -= 1
                    self._abort(ws)
                    break
                if op == "validate":
                    if self.silent_validate:
                        continue
                    self.validations += 1
                    validated = frame.get("object") == self.token
                    await ws.send_json(_VALIDATED if validated else _INVALID_TOKEN)
                elif not validated:
                    await ws.send_json(_NOT_VALIDATED)
                elif op == "connectExtension":
                    await self._connect_extension(ws, frame)
                elif op == "notification":
                    async with self._notified:
                        self.notifications[str(frame.get("resourceId"))].append(frame.get("object"))
                        self._notified.notify_all()
                elif "status" in frame and isinstance(frame.get("headers"), dict):
                    self._replies.deliver(frame)
                else:
                    self.bad_frames += 1
        finally:
            self.close_codes.append(ws.close_code)
            self._sockets.discard(ws)
            self._requests.pop(ws, None)
            for state in self._sources.values():
                if state.ws is ws:
                    state.ws = None
                    state.attached.clear()
        return ws

    async def _connect_extension(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        source = str(frame.get("resourceId"))
        state = self.source(source)
        state.connects += 1
        if state.refusal is not None:
            status, code, message = state.refusal
            await ws.send_json({"status": status, "body": [{"code": code, "message": message,
                                                            "params": [source]}]})
            return
        secret = (frame.get("parameters") or {}).get("reconnectSecret", "")
        if not str(secret).startswith(f"{source}_"):
            await ws.send_json({"status": 400, "body": [{"code": "io.vantiq.bad.secret",
                                                         "message": "Bad reconnect secret.", "params": []}]})
            return
        state.ws = ws
        if self.configure_delay:
            await asyncio.sleep(self.configure_delay)
        await self._send_configure(source, ws)

    async def _send_configure(self, source: str, ws: web.WebSocketResponse) -> None:
        state = self.source(source)
        await ws.send_json({"op": "configureExtension", "resourceName": "sources", "resourceId": source,
                            "object": {"config": state.config}})
        state.attached.set()

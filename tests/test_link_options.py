"""connectKWArgs on the link's own websocket (websockets' sans-I/O protocol, driven by linksocket.py):
proxies (a real HTTP CONNECT proxy on loopback, plain and TLS, from the key or the environment), the
handshake's headers, compression, and the sans-I/O driver itself (fragments, pings, the size ceiling)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl

import pytest
import trustme
from websockets.frames import Close, Opcode
from websockets.http11 import USER_AGENT
from websockets.server import ServerProtocol

from pyexec_connector.config import build_server_config
from pyexec_connector.connector import Connector
from pyexec_connector.devserver import DevServer
from pyexec_connector.link import ConnectionFailed, socket_options
from pyexec_connector.websocket import ClientWebSocket, SocketOptions

from .conftest import SOURCE, TOKEN


class ConnectProxy:
    """An HTTP proxy that only tunnels (CONNECT), on loopback: it records each request's head."""

    def __init__(self, *, refuse: bool = False):
        self.requests: list[str] = []
        self.refuse = refuse
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task] = set()

    async def __aenter__(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        self.requests.append(head)
        if self.refuse:
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        host, port = head.split(" ")[1].rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        for task in (asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer))):
            self._pipes.add(task)


def connector_for(server: DevServer, **props) -> Connector:
    values = {"targetServer": server.url, "authToken": TOKEN, "sources": SOURCE}
    values.update({k: (json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in props.items()})
    return Connector(build_server_config(values, env={}), backoff_initial=0.02, backoff_max=0.2,
                     handshake_timeout=2.0)


@contextlib.asynccontextmanager
async def running(connector: Connector):
    task = asyncio.create_task(connector.run())
    try:
        yield connector
    finally:
        connector.stop()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)


def no_environment_proxy(monkeypatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy", "wss_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


# ---- proxies ---------------------------------------------------------------------------------------

async def test_through_an_http_proxy_given_in_connect_kwargs(server, monkeypatch):
    no_environment_proxy(monkeypatch)
    async with ConnectProxy() as proxy:
        url = proxy.url.replace("http://", "http://user:p%40ss@")
        async with running(connector_for(server, connectKWArgs={"proxy": url})) as connector:
            await connector.wait_ready(timeout=10)
            assert (await server.query({"code": "x = 1"})).results == {"x": 1}
    assert len(proxy.requests) == 1
    head = proxy.requests[0]
    assert head.startswith(f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\n")
    assert f"Proxy-Authorization: Basic {base64.b64encode(b'user:p@ss').decode()}" in head


async def test_wss_through_the_proxy_verifies_the_server_not_the_proxy(monkeypatch, tmp_path):
    no_environment_proxy(monkeypatch)
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    server = DevServer(token=TOKEN, sources=(SOURCE,))
    await server.start(ssl=context)
    try:
        async with ConnectProxy() as proxy:
            props = {"connectKWArgs": {"proxy": proxy.url, "caFile": str(ca_file)}}
            async with running(connector_for(server, **props)) as connector:
                await connector.wait_ready(timeout=10)
                assert (await server.query({"code": "x = 2"})).results == {"x": 2}
        assert len(proxy.requests) == 1
    finally:
        await server.stop()


async def test_the_environments_proxy_is_used_unless_the_key_says_null(server, monkeypatch):
    no_environment_proxy(monkeypatch)
    async with ConnectProxy() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        async with running(connector_for(server)) as connector:
            await connector.wait_ready(timeout=10)
            assert (await server.query({"code": "x = 3"})).results == {"x": 3}
        assert len(proxy.requests) == 1
        async with running(connector_for(server, connectKWArgs={"proxy": None})) as connector:
            await connector.wait_ready(timeout=10)
        assert len(proxy.requests) == 1             # the second connector went straight to the server
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        async with running(connector_for(server)) as connector:
            await connector.wait_ready(timeout=10)
        assert len(proxy.requests) == 1


async def test_a_proxy_that_refuses_the_tunnel_is_named_and_retried(server, monkeypatch, caplog):
    no_environment_proxy(monkeypatch)
    async with ConnectProxy(refuse=True) as proxy:
        async with running(connector_for(server, connectKWArgs={"proxy": proxy.url})) as connector:
            async with asyncio.timeout(10):
                while len(proxy.requests) < 3:
                    await asyncio.sleep(0.02)
            assert not connector.ready
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("the proxy refused the tunnel: HTTP/1.1 403 Forbidden" in w for w in warnings), warnings


async def test_a_socks_proxy_is_a_clear_error_naming_the_key(server, monkeypatch):
    no_environment_proxy(monkeypatch)
    connector = connector_for(server, failOnConnectionError="true",
                              connectKWArgs={"proxy": "socks5://user:secret@127.0.0.1:1080"})
    with pytest.raises(ConnectionFailed) as info:
        await asyncio.wait_for(connector.run(), 10)
    message = str(info.value)
    assert "connectKWArgs.proxy" in message and "SOCKS" in message
    assert "secret" not in message


# ---- the handshake and the options ---------------------------------------------------------------

async def test_the_handshake_sends_websockets_user_agent_and_the_headers_given(server, monkeypatch):
    no_environment_proxy(monkeypatch)
    async with running(connector_for(server)) as connector:
        await connector.wait_ready(timeout=10)
    assert server.upgrades[-1].headers["User-Agent"] == USER_AGENT
    assert not server.upgrades[-1].compressed            # off unless asked for: replies are small JSON
    props = {"connectKWArgs": {"extra_headers": {"X-Team": "blue"}, "user_agent_header": "probe/1",
                               "origin": "https://app.example"}}
    async with running(connector_for(server, **props)) as connector:
        await connector.wait_ready(timeout=10)
    headers = server.upgrades[-1].headers
    assert headers["X-Team"] == "blue" and headers["User-Agent"] == "probe/1"
    assert headers["Origin"] == "https://app.example"


async def test_compression_deflate_is_negotiated_and_queries_flow(server, monkeypatch):
    no_environment_proxy(monkeypatch)
    async with running(connector_for(server, connectKWArgs={"compression": "deflate"})) as connector:
        await connector.wait_ready(timeout=10)
        big = "z" * 200_000
        result = await server.query({"code": "y = len(x)", "presetValues": {"x": big}})
        assert result.results == {"x": big, "y": 200_000}
    assert server.upgrades[-1].compressed


def test_connect_kwargs_become_the_sockets_options(caplog):
    config = build_server_config({
        "targetServer": "https://vantiq.example", "authToken": TOKEN, "sources": SOURCE, "sendPings": "true",
        "connectKWArgs": json.dumps({"open_timeout": 7, "close_timeout": 2, "ping_timeout": 3, "max_size": 4096,
                                     "write_limit": [65536, 1024], "max_queue": 4, "local_addr": ["127.0.0.1", 0],
                                     "subprotocols": ["v1"], "proxy": "http://proxy.example:3128"})}, env={})
    with caplog.at_level(logging.INFO, logger="pyexec_connector.link"):
        options = socket_options(config)
    assert (options.open_timeout, options.close_timeout, options.ping_interval, options.ping_timeout) == (7, 2, 20, 3)
    assert options.max_size == 4096 and options.write_limit == (65536, 1024)
    assert options.subprotocols == ["v1"] and options.proxy == "http://proxy.example:3128"
    assert options.connection == {"local_addr": ["127.0.0.1", 0]}
    assert isinstance(options.ssl, ssl.SSLContext)
    assert "connectKWArgs.max_queue has no effect" in caplog.text


# ---- the sans-I/O driver on its own, against websockets' own server side -------------------------------

class Wire:
    """A transport that keeps what is written."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def to_server(wire: Wire, server: ServerProtocol) -> list:
    server.receive_data(bytes(wire.data))
    wire.data.clear()
    return server.events_received()


def to_client(server: ServerProtocol, ws: ClientWebSocket) -> list:
    return ws.receive(b"".join(server.data_to_send()))


def opened(max_size: int | None = 1 << 20) -> tuple[ClientWebSocket, Wire, ServerProtocol]:
    """A driver past its opening handshake with websockets' ServerProtocol."""
    ws = ClientWebSocket("ws://127.0.0.1:9/api", SocketOptions(max_size=max_size), logging.getLogger("t"))
    wire, server = Wire(), ServerProtocol()
    ws.start(wire)
    request = to_server(wire, server)[0]
    server.send_response(server.accept(request))
    events = to_client(server, ws)
    assert len(events) == 1 and ws.handshake_error() is None and ws.open
    return ws, wire, server


def test_fragments_make_one_message_and_a_ping_is_answered():
    ws, wire, server = opened()
    server.send_text(b'{"op": ', fin=False)
    assert to_client(server, ws) == []
    server.send_ping(b"hi")
    server.send_continuation(b'"x"}', fin=True)
    assert to_client(server, ws) == [b'{"op": "x"}']
    assert [(e.opcode, e.data) for e in to_server(wire, server)] == [(Opcode.PONG, b"hi")]   # at once


def test_a_keepalive_ping_is_settled_only_by_its_own_pong():
    ws, wire, server = opened()
    ws.ping()
    assert not ws.pong_received
    (ping,) = to_server(wire, server)
    assert ping.opcode is Opcode.PING
    answer = server.data_to_send()            # websockets' server answers it itself
    server.send_pong(b"other")
    to_client(server, ws)
    assert not ws.pong_received
    ws.receive(b"".join(answer))
    assert ws.pong_received


def test_a_message_over_max_size_fails_the_websocket_with_1009():
    ws, wire, server = opened(max_size=1024)
    server.send_text(b"a" * 600, fin=False)
    server.send_continuation(b"b" * 600, fin=True)
    assert to_client(server, ws) == []
    assert not ws.open and ws.close_expected()      # the server is to end the TCP connection now
    (close,) = to_server(wire, server)
    assert close.opcode is Opcode.CLOSE and Close.parse(close.data).code == 1009


def test_a_lone_surrogate_goes_out_escaped_instead_of_failing_the_websocket():
    ws, wire, server = opened()
    ws.send_texts(['{"a": "\ud800"}', '{"b": 1}'])
    assert ws.open
    assert [e.data for e in to_server(wire, server)] == [b'{"a": "\\ud800"}', b'{"b": 1}']

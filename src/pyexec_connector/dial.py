"""Opening the link's TCP (and TLS) connection: directly, or through an HTTP(S) proxy's CONNECT tunnel.

connectKWArgs `proxy`: a proxy URL, true (the default: the environment's https_proxy / http_proxy /
no_proxy, as websockets 15+ does), or null (never). SOCKS proxies are refused with an error naming
the key. Other connectKWArgs keys that loop.create_connection takes (local_addr, ...) go to the
connection to the proxy when there is one, as websockets does; TLS keys go to the server's TLS."""
from __future__ import annotations

import asyncio
import base64
import ssl as ssl_module
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from websockets.uri import WebSocketURI

from .websocket import SocketOptions

MAX_PROXY_ANSWER = 64 * 1024
_TLS_KEYS = ("server_hostname", "ssl_handshake_timeout", "ssl_shutdown_timeout")


class ProxyError(OSError):
    """The proxy could not be used or refused the tunnel (retried like any failed connection)."""


def proxy_for(uri: WebSocketURI, proxy: str | bool | None) -> str | None:
    """The proxy URL to go through for `uri`, or None. True: the environment's, unless no_proxy
    exempts the host (a SOCKS one first, then HTTPS before HTTP, as RFC 6455 and websockets do)."""
    if proxy is None or proxy is False:
        return None
    if proxy is not True:
        return str(proxy)
    if urllib.request.proxy_bypass(f"{uri.host}:{uri.port}"):
        return None
    proxies = urllib.request.getproxies()
    for scheme in (("wss", "socks", "https") if uri.secure else ("ws", "socks", "https", "http")):
        found = proxies.get(scheme)
        if found is not None:
            return "socks5h://" + found[7:] if scheme == "socks" and found.startswith("http://") else found
    return None


async def dial(factory: Callable[[], asyncio.Protocol], uri: WebSocketURI, options: SocketOptions) -> None:
    """Connect `factory()`'s protocol to the server at `uri` (connection_made is called on it)."""
    loop = asyncio.get_running_loop()
    kwargs: dict[str, Any] = dict(options.connection)
    tls: dict[str, Any] = {key: kwargs.pop(key) for key in _TLS_KEYS if key in kwargs}
    context = None
    if uri.secure:
        context = options.ssl if options.ssl is not None else ssl_module.create_default_context()
        tls.setdefault("server_hostname", uri.host)
    proxy = proxy_for(uri, options.proxy)
    if proxy is None:
        await loop.create_connection(factory, uri.host, uri.port, ssl=context, **(tls if context else {}), **kwargs)
        return
    parts = urlsplit(proxy)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ProxyError(f"connectKWArgs.proxy: {_without_password(proxy)} is not an http:// or https:// proxy "
                         "(the connector does not speak SOCKS); give an HTTP proxy, or null for none")
    tunnel = _Tunnel(_connect_request(uri, parts, options.user_agent_header))
    transport, _ = await loop.create_connection(
        lambda: tunnel, parts.hostname, parts.port or (443 if scheme == "https" else 80),
        ssl=ssl_module.create_default_context() if scheme == "https" else None, **kwargs)
    try:
        await tunnel.established
        protocol = factory()
        transport.set_protocol(protocol)
        if context is not None:
            tls_transport = await loop.start_tls(transport, protocol, context, **tls)
            if tls_transport is None:
                raise ProxyError("TLS through the proxy's tunnel could not start")
            transport = tls_transport
    except BaseException:
        transport.abort()
        raise
    protocol.connection_made(transport)


def _connect_request(uri: WebSocketURI, proxy: Any, user_agent: str | None) -> bytes:
    host = f"[{uri.host}]" if ":" in uri.host else uri.host
    lines = [f"CONNECT {host}:{uri.port} HTTP/1.1", f"Host: {host}:{uri.port}"]
    if user_agent is not None:
        lines.append(f"User-Agent: {user_agent}")
    if proxy.username is not None:
        secret = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}".encode()
        lines.append(f"Proxy-Authorization: Basic {base64.b64encode(secret).decode()}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"{parts.username}:***@{parts.hostname}"
                          + (f":{parts.port}" if parts.port else "")).geturl()


class _Tunnel(asyncio.Protocol):
    """The proxy's answer to CONNECT; `established` once it says 2xx (its headers bounded in size)."""

    def __init__(self, request: bytes):
        self._request = request
        self._answer = bytearray()
        self.established: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self._request)      # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.established.done():
            return
        self._answer += data
        end = self._answer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._answer) > MAX_PROXY_ANSWER:
                self._fail(ProxyError(f"the proxy's answer to CONNECT is over {MAX_PROXY_ANSWER} bytes"))
            return
        status_line = bytes(self._answer[:self._answer.find(b"\r\n")]).decode("latin-1")
        words = status_line.split(" ", 2)
        if len(words) < 2 or not words[0].startswith("HTTP/") or not words[1].isdigit():
            self._fail(ProxyError(f"the proxy did not answer CONNECT in HTTP: {status_line[:100]!r}"))
        elif not 200 <= int(words[1]) < 300:
            self._fail(ProxyError(f"the proxy refused the tunnel: {status_line[:200]}"))
        elif end + 4 != len(self._answer):
            self._fail(ProxyError("the proxy sent data before the websocket's handshake"))
        else:
            self.established.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ProxyError("the proxy closed the connection before answering CONNECT"))

    def _fail(self, exc: BaseException) -> None:
        if not self.established.done():
            self.established.set_exception(exc)

"""What an operator sees: the upstream-compatible TCP probe, and HTTP /healthz, /readyz and /metrics
(Prometheus text format) on `metricsPort`, served with aiohttp on the connector's own loop."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .querylog import QueryFigures

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from .session import SourceSession

log = logging.getLogger(__name__)


class Metrics:
    """One connector's metrics, in its own CollectorRegistry (several connectors in one process do not
    collide). Each source's queries are counted by its QueryLog into that source's QueryFigures (plain
    numbers, from `figures`); those and everything else are read when scraped. prometheus_client (and the
    http.server, wsgiref and email modules it imports) is loaded on the first scrape, not at start: ~2 MiB
    of the connector's own memory that a connector nobody scrapes never needs (docs/PERFORMANCE.md, issue
    11 (h))."""

    def __init__(self, sessions: Callable[[], Mapping[str, SourceSession]],
                 environments: Callable[[], Any] | None = None):
        self._sessions = sessions
        self._environments = environments       # envs.manager.EnvironmentFigures, or None (feature off)
        self._registry: CollectorRegistry | None = None
        self._figures: dict[str, QueryFigures] = {}

    @property
    def registry(self) -> CollectorRegistry:
        if self._registry is None:
            from . import exposition
            self._registry = exposition.registry(self._figures, self._sessions, self._environments)
        return self._registry

    def figures(self, source: str) -> QueryFigures:
        """The query figures /metrics exports for `source` (made on first ask), for its QueryLog to count into."""
        figures = self._figures.get(source)
        if figures is None:
            figures = self._figures[source] = QueryFigures()
        return figures

    def exposition(self) -> bytes:
        from . import exposition
        return exposition.render(self.registry)


class HttpEndpoints:
    """GET /healthz, /readyz and /metrics on `port`, on the running loop. aiohttp's server is imported
    when they start: without metricsPort the connector does not carry it (about 15 MB of RSS)."""

    def __init__(self, connector: Any, port: int, host: str = "0.0.0.0"):
        self._connector = connector
        self._port = port
        self._host = host
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        from aiohttp import web
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise ConfigError(f"cannot listen on port {self._port}: {exc.strerror or exc}", key="metricsPort") from None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("health and metrics on http://%s:%d (/healthz, /readyz, /metrics)", self._host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        from aiohttp import web
        problems = self._connector.health_problems()
        body = {"status": "unhealthy" if problems else "ok", "problems": problems}
        return web.json_response(body, status=503 if problems else 200)

    async def _readyz(self, request: web.Request) -> web.Response:
        from aiohttp import web
        not_ready = self._connector.not_ready()
        body = {"status": "not ready" if not_ready else "ready", "notReady": not_ready}
        return web.json_response(body, status=503 if not_ready else 200)

    async def _metrics(self, request: web.Request) -> web.Response:
        from aiohttp import web

        from .exposition import CONTENT_TYPE
        response = web.Response(body=self._connector.metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response


class TcpProbe:
    """The upstream-compatible plain TCP probe: a listener on every interface that accepts and closes.
    Open while healthy."""

    def __init__(self, port: int, host: str | None = None):
        self._port = port
        self._host = host
        self._server: asyncio.Server | None = None
        self._lock = asyncio.Lock()     # declare_healthy/unhealthy from concurrent queries

    @property
    def open(self) -> bool:
        return self._server is not None

    async def set(self, healthy: bool) -> None:
        async with self._lock:
            if healthy:
                await self.start()
            else:
                await self.stop()

    async def start(self) -> None:
        if self._server is not None:
            return
        try:
            self._server = await asyncio.start_server(self._accept, self._host, self._port, reuse_address=True)
        except OSError as exc:
            log.error("the TCP health probe cannot listen on port %d: %s", self._port, exc)
            return
        log.info("TCP health probe listening on port %d", self._port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
            log.info("TCP health probe on port %d closed", self._port)

    @staticmethod
    async def _accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

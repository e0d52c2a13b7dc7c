"""What an operator sees: the upstream-compatible TCP probe, and HTTP /healthz, /readyz and /metrics
(Prometheus text format) on `metricsPort`, served with aiohttp on the connector's own loop."""
from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .session import QueryEnded

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from .session import SourceSession

log = logging.getLogger(__name__)

PREFIX = "pyexec"
MAX_MESSAGE_CODES = 100     # distinct message_code label values per source; the rest count as OTHER_CODE
OTHER_CODE = "other"
_OK_STATUSES = frozenset({200, 204})
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# engine.stats() keys -> (metric name, help, counter?)
ENGINE_FIGURES = {
    "workers_alive": ("engine_workers_alive", "Worker processes alive", False),
    "worker_restarts": ("engine_worker_restarts", "Worker processes restarted", True),
    "timeouts": ("engine_timeouts", "Queries stopped for running past their time limit", True),
    "queue_depth": ("engine_queue_depth", "Queries waiting for a worker", False),
    "queued_bytes": ("engine_queued_bytes", "What the queries waiting for a worker cost, in bytes (bounded by "
                                            "maxQueuedBytes)", False),
    "worker_forks": ("engine_worker_forks", "Worker processes forked from a zygote", True),
    "worker_spawns": ("engine_worker_spawns", "Worker processes spawned as fresh interpreters", True),
    "worker_idle_retired": ("engine_worker_idle_retired", "Workers beyond minWorkers ended after "
                            "workerIdleSeconds idle", True),
    "worker_wedged": ("engine_worker_wedged", "Workers killed for not answering a liveness ping while "
                      "running no query", True),
    "query_processes_ended": ("engine_query_processes_ended", "Processes user code started that were still "
                              "running when their query ended, ended then (keepChildProcesses: false)", True),
    "queries_requeued": ("engine_queries_requeued", "Queries taken back from a silent worker that never "
                         "read them and given to another", True),
}


class _QueryFigures:
    """One source's query counts, kept as plain numbers: observe() is on every query, and prometheus'
    own Counter and Histogram take a lock and look their labels up on each call."""

    __slots__ = ("ok", "error", "buckets", "total_seconds", "errors")

    def __init__(self) -> None:
        self.ok = 0
        self.error = 0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)    # per bucket (the last: +Inf), not cumulative
        self.total_seconds = 0.0
        self.errors: dict[str, int] = {}


class Metrics:
    """One connector's metrics, in its own CollectorRegistry (several connectors in one process do not
    collide). Queries are counted through `observe` (the sessions' observer hook) into plain numbers;
    those and everything else are read when scraped. prometheus_client (and the http.server, wsgiref and
    email modules it imports) is loaded on the first scrape, not at start: ~2 MiB of the connector's own
    memory that a connector nobody scrapes never needs (docs/PERFORMANCE.md, issue 11 (h))."""

    def __init__(self, sessions: Callable[[], Mapping[str, SourceSession]]):
        self._sessions = sessions
        self._registry: CollectorRegistry | None = None
        self._figures: dict[str, _QueryFigures] = {}

    @property
    def registry(self) -> CollectorRegistry:
        if self._registry is None:
            from . import exposition
            self._registry = exposition.registry(self._figures, self._sessions)
        return self._registry

    def observe(self, ended: QueryEnded) -> None:
        figures = self._figures.get(ended.source)
        if figures is None:
            figures = self._figures[ended.source] = _QueryFigures()
        duration = ended.duration
        figures.buckets[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
        figures.total_seconds += duration
        code = ended.message_code
        if ended.status in _OK_STATUSES:
            figures.ok += 1
        else:
            figures.error += 1
        if code is not None:
            errors = figures.errors
            if code not in errors and len(errors) >= MAX_MESSAGE_CODES:
                # user code picks its own messageCodes (QueryError): the label's values must stay bounded
                if OTHER_CODE not in errors:
                    log.warning("source %s: more than %d distinct error messageCodes; further ones are "
                                "counted as %r in pyexec_query_errors_total", ended.source, MAX_MESSAGE_CODES,
                                OTHER_CODE)
                code = OTHER_CODE
            errors[code] = errors.get(code, 0) + 1

    def exposition(self) -> bytes:
        from . import exposition
        return exposition.render(self.registry)


def engine_stats(engine: Any) -> dict[str, Any]:
    """engine.stats() when the engine has it (the process engine does; the inline engine need not)."""
    stats = getattr(engine, "stats", None)
    if not callable(stats):
        return {}
    try:
        figures = stats()
    except Exception:  # noqa: BLE001 - a scrape must not fail because an engine is restarting
        log.debug("engine.stats() failed", exc_info=True)
        return {}
    return figures if isinstance(figures, dict) else {}


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

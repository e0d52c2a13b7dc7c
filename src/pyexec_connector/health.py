"""What an operator sees: the upstream-compatible TCP probe, and HTTP /healthz, /readyz and /metrics
(Prometheus text format) on `metricsPort`, served with aiohttp on the connector's own loop."""
from __future__ import annotations

import asyncio
import bisect
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import logqueue
from .errors import ConfigError
from .session import QueryEnded

if TYPE_CHECKING:
    from aiohttp import web

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
    those and everything else are read when scraped."""

    def __init__(self, sessions: Callable[[], Mapping[str, SourceSession]]):
        self.registry = CollectorRegistry(auto_describe=True)
        self._figures: dict[str, _QueryFigures] = {}
        self.registry.register(_QueryCollector(self._figures))
        self.registry.register(_SessionCollector(sessions))

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
        return generate_latest(self.registry)


class _QueryCollector(Collector):
    def __init__(self, figures: dict[str, _QueryFigures]):
        self._figures = figures

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        queries = CounterMetricFamily(f"{PREFIX}_queries", "Queries answered, by source and outcome (ok, error)",
                                      labels=["source", "outcome"])
        duration = HistogramMetricFamily(f"{PREFIX}_query_duration_seconds",
                                         "Time from a query's arrival to its terminal reply", labels=["source"])
        errors = CounterMetricFamily(f"{PREFIX}_query_errors", "Error replies, by source and messageCode",
                                     labels=["source", "message_code"])
        for source, figures in list(self._figures.items()):
            queries.add_metric([source, "ok"], figures.ok)
            queries.add_metric([source, "error"], figures.error)
            cumulative, buckets = 0, []
            for bound, count in zip((*DURATION_BUCKETS, math.inf), figures.buckets, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            duration.add_metric([source], buckets, figures.total_seconds)
            for code, count in list(figures.errors.items()):
                errors.add_metric([source, code], count)
        yield from (queries, duration, errors)


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


class _SessionCollector(Collector):
    def __init__(self, sessions: Callable[[], Mapping[str, SourceSession]]):
        self._sessions = sessions

    def describe(self) -> Iterable[Any]:
        return []      # values are read at scrape time; nothing to check at registration

    def collect(self) -> Iterable[Any]:
        sessions = self._sessions()
        connected = GaugeMetricFamily(f"{PREFIX}_source_connected",
                                      "1 while the source is connected and configured", labels=["source"])
        in_flight = GaugeMetricFamily(f"{PREFIX}_queries_in_flight", "Queries being answered", labels=["source"])
        reconnects = CounterMetricFamily(f"{PREFIX}_link_reconnects", "Websocket reconnects", labels=["source"])
        pending = GaugeMetricFamily(f"{PREFIX}_link_pending_bytes", "Bytes of frames waiting for the websocket "
                                    "(bounded by maxPendingBytes)", labels=["source"])
        waits = CounterMetricFamily(f"{PREFIX}_link_sender_waits", "Times a sender waited for room in the "
                                    "outbox (the server read slower than replies were made)", labels=["source"])
        fetches = CounterMetricFamily(f"{PREFIX}_document_fetches",
                                      "Document metadata requests (a script query checks the document each time)",
                                      labels=["source"])
        downloads = CounterMetricFamily(f"{PREFIX}_document_downloads", "Document contents downloaded",
                                        labels=["source"])
        hits = CounterMetricFamily(f"{PREFIX}_code_cache_hits", "Compiled-code cache hits", labels=["source"])
        misses = CounterMetricFamily(f"{PREFIX}_code_cache_misses", "Compiled-code cache misses",
                                     labels=["source"])
        size = GaugeMetricFamily(f"{PREFIX}_code_cache_size", "Entries in the compiled-code cache",
                                 labels=["source"])
        capacity = GaugeMetricFamily(f"{PREFIX}_code_cache_capacity", "Capacity of the compiled-code cache",
                                     labels=["source"])
        engine_families = {
            key: (CounterMetricFamily if counter else GaugeMetricFamily)(f"{PREFIX}_{name}", text, labels=["source"])
            for key, (name, text, counter) in ENGINE_FIGURES.items()}
        recycles = CounterMetricFamily(f"{PREFIX}_engine_worker_recycles", "Workers replaced after "
                                       "maxQueriesPerWorker or maxWorkerMemoryMB", labels=["source", "reason"])
        engines: dict[int, tuple[Any, list[str]]] = {}
        for name, session in sessions.items():
            connected.add_metric([name], 1.0 if session.link.ready else 0.0)
            in_flight.add_metric([name], len(session.in_flight))
            reconnects.add_metric([name], session.link.reconnects)
            pending.add_metric([name], session.link.pending_bytes)
            waits.add_metric([name], session.link.sender_waits)
            fetches.add_metric([name], session.documents.fetches)
            downloads.add_metric([name], session.documents.downloads)
            engines.setdefault(id(session.engine), (session.engine, []))[1].append(name)
        for engine, names in engines.values():
            label = ",".join(names)    # an engine shared by several sources is reported once
            stats = engine_stats(engine)
            cache = getattr(engine, "cache", None)
            figures = {
                "cache_hits": stats.get("cache_hits", getattr(cache, "hits", None)),
                "cache_misses": stats.get("cache_misses", getattr(cache, "misses", None)),
                "cache_size": stats.get("cache_size", len(cache) if cache is not None else None),
                "cache_capacity": stats.get("cache_capacity", getattr(cache, "capacity", None)),
            }
            for family, key in ((hits, "cache_hits"), (misses, "cache_misses"), (size, "cache_size"),
                                (capacity, "cache_capacity")):
                figure = figures[key]
                if isinstance(figure, int | float):
                    family.add_metric([label], figure)
            for key, family in engine_families.items():
                value = stats.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    family.add_metric([label], value)
            if "worker_recycles" in stats:
                for reason in ("queries", "memory"):
                    recycles.add_metric([label, reason], stats["worker_recycles"].get(reason, 0))
        yield from (connected, in_flight, reconnects, pending, waits, fetches, downloads, hits, misses, size,
                    capacity, recycles)
        pump = logqueue.current()
        if pump is not None:
            dropped = CounterMetricFamily(f"{PREFIX}_log_lines_dropped", "Log lines dropped because the log "
                                          "output did not keep up")
            dropped.add_metric([], pump.dropped_total)
            yield dropped
        yield from (f for f in engine_families.values() if f.samples)


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
        response = web.Response(body=self._connector.metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
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

"""The Prometheus side of health.Metrics: its collectors, which read the figures when scraped, and the
text format. Imported on the first scrape (see health.Metrics), so prometheus_client is not loaded by a
connector that nobody scrapes."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import logqueue
from .engine.stats import EngineStats
from .figures import engine_stats
from .querylog import DURATION_BUCKETS, QueryFigures

if TYPE_CHECKING:
    from .engine.base import Engine
    from .session import SourceSession

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "pyexec"
# one series per source and engine figure: (metric name, help, counter?, the figure; None: none reported)
ENGINE_FIGURES: tuple[tuple[str, str, bool, Callable[[EngineStats], int | None]], ...] = (
    ("engine_workers_alive", "Worker processes alive", False, lambda s: s.workers_alive),
    ("engine_worker_restarts", "Worker processes restarted", True, lambda s: s.worker_restarts),
    ("engine_timeouts", "Queries stopped for running past their time limit", True, lambda s: s.timeouts),
    ("engine_queue_depth", "Queries waiting for a worker", False, lambda s: s.queue_depth),
    ("engine_queued_bytes", "What the queries waiting for a worker cost, in bytes (bounded by maxQueuedBytes)",
     False, lambda s: s.queued_bytes),
    ("engine_worker_forks", "Worker processes forked from a zygote", True, lambda s: s.worker_forks),
    ("engine_worker_spawns", "Worker processes spawned as fresh interpreters", True, lambda s: s.worker_spawns),
    ("engine_worker_idle_retired", "Workers beyond minWorkers ended after workerIdleSeconds idle", True,
     lambda s: s.worker_idle_retired),
    ("engine_worker_wedged", "Workers killed for not answering a liveness ping while running no query", True,
     lambda s: s.worker_wedged),
    ("engine_credit", "Runs the workers asked for and were not sent yet (pull with credit)", False,
     lambda s: s.credit),
    ("engine_credit_overdrawn", "Runs sent to workers beyond what they asked for (0 unless credit is broken)",
     False, lambda s: s.credit_overdrawn),
    ("engine_query_processes_ended", "Processes user code started that were still running when their query "
     "ended, ended then (keepChildProcesses: false)", True, lambda s: s.query_processes_ended),
    ("engine_queries_requeued", "Queries taken back from a worker that never read them (silent, or ended) "
     "and given to another", True, lambda s: s.queries_requeued),
    ("engine_queries_spilled", "Runs held for a worker that fell behind its pace, given to another before it "
     "saw them", True, lambda s: s.queries_spilled),
)
CACHE_FIGURES: tuple[tuple[str, str, bool, Callable[[EngineStats], int]], ...] = (
    ("code_cache_hits", "Compiled-code cache hits", True, lambda s: s.cache_hits),
    ("code_cache_misses", "Compiled-code cache misses", True, lambda s: s.cache_misses),
    ("code_cache_size", "Entries in the compiled-code cache", False, lambda s: s.cache_size),
    ("code_cache_capacity", "Capacity of the compiled-code cache", False, lambda s: s.cache_capacity),
)
RECYCLE_REASONS = ("queries", "memory")


def registry(figures: dict[str, QueryFigures], sessions: Callable[[], Mapping[str, SourceSession]],
             environments: Callable[[], Any] | None = None) -> CollectorRegistry:
    """A registry of its own per connector: several connectors in one process do not collide."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_QueryCollector(figures))
    registry.register(_SessionCollector(sessions))
    if environments is not None:
        from .envs.metrics import EnvironmentCollector
        registry.register(EnvironmentCollector(environments, PREFIX))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class _QueryCollector(Collector):
    def __init__(self, figures: dict[str, QueryFigures]):
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
        cache_families = [(CounterMetricFamily if counter else GaugeMetricFamily)(f"{PREFIX}_{name}", text,
                                                                                 labels=["source"])
                          for name, text, counter, _ in CACHE_FIGURES]
        engine_families = [(CounterMetricFamily if counter else GaugeMetricFamily)(f"{PREFIX}_{name}", text,
                                                                                  labels=["source"])
                           for name, text, counter, _ in ENGINE_FIGURES]
        recycles = CounterMetricFamily(f"{PREFIX}_engine_worker_recycles", "Workers replaced after "
                                       "maxQueriesPerWorker or maxWorkerMemoryMB", labels=["source", "reason"])
        engines: dict[int, tuple[Engine, list[str]]] = {}
        for name, session in sessions.items():
            connected.add_metric([name], 1.0 if session.link.ready else 0.0)
            in_flight.add_metric([name], session.running)
            reconnects.add_metric([name], session.link.reconnects)
            pending.add_metric([name], session.link.pending_bytes)
            waits.add_metric([name], session.link.sender_waits)
            fetches.add_metric([name], session.documents.fetches)
            downloads.add_metric([name], session.documents.downloads)
            if session.engine is not None:      # None until the source's first configuration
                engines.setdefault(id(session.engine), (session.engine, []))[1].append(name)
        for engine, names in engines.values():
            label = ",".join(names)    # an engine shared by several sources is reported once
            stats = engine_stats(engine)
            for family, (_, _, _, cache_figure) in zip(cache_families, CACHE_FIGURES, strict=True):
                family.add_metric([label], cache_figure(stats))
            for family, (_, _, _, figure) in zip(engine_families, ENGINE_FIGURES, strict=True):
                value = figure(stats)
                if value is not None:
                    family.add_metric([label], value)
            if stats.worker_recycles is not None:
                for reason in RECYCLE_REASONS:
                    recycles.add_metric([label, reason], stats.worker_recycles.get(reason, 0))
        yield from (connected, in_flight, reconnects, pending, waits, fetches, downloads, *cache_families, recycles)
        pump = logqueue.current()
        if pump is not None:
            dropped = CounterMetricFamily(f"{PREFIX}_log_lines_dropped", "Log lines dropped because the log "
                                          "output did not keep up")
            dropped.add_metric([], pump.dropped_total)
            yield dropped
        yield from (f for f in engine_families if f.samples)

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
from .health import DURATION_BUCKETS, ENGINE_FIGURES, PREFIX, engine_stats

if TYPE_CHECKING:
    from .health import _QueryFigures
    from .session import SourceSession

CONTENT_TYPE = CONTENT_TYPE_LATEST


def registry(figures: dict[str, _QueryFigures], sessions: Callable[[], Mapping[str, SourceSession]],
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

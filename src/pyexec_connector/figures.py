"""The figures health.py keeps and exposition.py exports, as plain numbers: below both, so that neither
imports the other (health.Metrics loads exposition, and prometheus_client with it, on the first scrape)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .engine.stats import EngineStats

if TYPE_CHECKING:
    from .engine.base import Engine

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_NOTHING = EngineStats()


class QueryFigures:
    """One source's query counts, kept as plain numbers: health.QueryLog.ended() is on every query, and
    prometheus' own Counter and Histogram take a lock and look their labels up on each call."""

    __slots__ = ("ok", "error", "buckets", "total_seconds", "errors")

    def __init__(self) -> None:
        self.ok = 0
        self.error = 0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)    # per bucket (the last: +Inf), not cumulative
        self.total_seconds = 0.0
        self.errors: dict[str, int] = {}


def engine_stats(engine: Engine) -> EngineStats:
    """engine.stats(), or an engine with nothing to report if that fails: a scrape or a health check must
    not fail because an engine is being replaced."""
    try:
        return engine.stats()
    except Exception:  # noqa: BLE001 - logged; the figures of one scrape are not worth an error page
        log.debug("engine.stats() failed", exc_info=True)
        return _NOTHING

"""An engine's figures for health.py and exposition.py, below both (health.Metrics loads exposition, and
prometheus_client with it, on the first scrape). The per-query counts are querylog.py's."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .engine.stats import EngineStats

if TYPE_CHECKING:
    from .engine.base import Engine

log = logging.getLogger(__name__)
_NOTHING = EngineStats()


def engine_stats(engine: Engine) -> EngineStats:
    """engine.stats(), or an engine with nothing to report if that fails: a scrape or a health check must
    not fail because an engine is being replaced."""
    try:
        return engine.stats()
    except Exception:  # noqa: BLE001 - logged; the figures of one scrape are not worth an error page
        log.debug("engine.stats() failed", exc_info=True)
        return _NOTHING


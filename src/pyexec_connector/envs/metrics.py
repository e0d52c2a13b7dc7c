"""The environments' figures as Prometheus metrics (read when scraped)."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .manager import EnvironmentFigures


class EnvironmentCollector(Collector):
    def __init__(self, figures: Callable[[], EnvironmentFigures | None], prefix: str):
        self._figures = figures
        self._prefix = prefix

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        figures = self._figures()
        if figures is None:
            return
        p = self._prefix
        for name, text, value in (
                ("environment_installs", "Per-script environments installed", figures.installs),
                ("environment_hits", "Requests for an environment that was installed already", figures.hits),
                ("environment_install_failures", "Environment installs that failed", figures.failures),
                ("environment_install_seconds", "Time spent installing environments", figures.install_seconds)):
            counter = CounterMetricFamily(f"{p}_{name}", text)
            counter.add_metric([], value)
            yield counter
        size = GaugeMetricFamily(f"{p}_environment_cache_bytes", "Bytes the installed environments take on disk "
                                 "(bounded by environmentsMaxMB)")
        size.add_metric([], figures.cache_bytes)
        yield size

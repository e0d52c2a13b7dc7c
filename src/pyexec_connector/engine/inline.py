"""Inline engine: user code runs on the connector's own event loop, as upstream does.

Not protected: code that blocks or loops forever stalls the whole connector (a timeout only ends code
that awaits), and a crash in a C extension ends it. SystemExit is caught. Use it only for trusted,
quick code."""
from __future__ import annotations

import asyncio
from typing import Any

from .. import errors
from ..cache import CodeCache
from ..config import SourceConfig
from ..errors import QueryError
from ..reply import ReplyChannel
from . import output, runtime
from .base import Job, Outcome
from .guard import CodeGuard


def timeout_error(seconds: float) -> QueryError:
    return QueryError(errors.TIMEOUT, "The code did not finish within its timeout of {0} seconds "
                                      "(WITH timeout, or the source's executionTimeout).", [seconds])


class InlineEngine:
    def __init__(self, connection: Any, config: SourceConfig | None = None):
        config = config or SourceConfig()
        self._connection = connection
        self.cache = CodeCache(config.codeCacheSize)
        self.guard = CodeGuard(config.codeGuard.forbid if config.codeGuard else ())
        self._tracking_installed = False
        self.timeouts = 0

    def reconfigure(self, config: SourceConfig) -> None:
        old = self.cache
        self.cache = CodeCache(config.codeCacheSize)
        # hits and misses count over the process's life (/metrics counters never go back)
        self.cache.hits, self.cache.misses = old.hits, old.misses
        self.guard = CodeGuard(config.codeGuard.forbid if config.codeGuard else ())

    async def run(self, job: Job, channel: ReplyChannel) -> Outcome:
        if not self._tracking_installed:
            runtime.install_task_tracking(asyncio.get_running_loop())
            self._tracking_installed = True
        if job.request.capture_output:
            output.install()
        try:
            async with asyncio.timeout(job.timeout):
                return await runtime.run_job(self.cache, job, self._connection, channel, self.guard)
        except TimeoutError:
            self.timeouts += 1
            raise timeout_error(job.timeout) from None

    def stats(self) -> dict[str, Any]:
        # no workers: None, not 0 (readiness reads workers_alive == 0 as "nothing can run code")
        return {"workers_alive": None, "worker_restarts": 0, "timeouts": self.timeouts, "queue_depth": None}

    async def close(self) -> None:
        self.cache.clear()

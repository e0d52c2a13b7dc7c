"""Inline engine: user code runs on the connector's own event loop, as upstream does.

Not protected: code that blocks or loops forever stalls the whole connector (a timeout only ends code
that awaits), and a crash in a C extension ends it. SystemExit is caught. Use it only for trusted,
quick code."""
from __future__ import annotations

import asyncio
from typing import Any

from .. import protocol
from ..cache import CodeCache
from ..config import SourceConfig
from ..reply import ReplyChannel
from . import output, runtime
from .base import Job, Outcome
from .guard import CodeGuard
from .pipeline import Pipeline, timeout_error
from .stats import EngineStats


class InlineEngine:
    def __init__(self, pipeline: Pipeline, connection: Any, config: SourceConfig | None = None):
        config = config or SourceConfig()
        self._pipeline = pipeline
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

    def submit(self, frame: protocol.QueryFrame, channel: ReplyChannel) -> None:
        self._pipeline.track(asyncio.ensure_future(self._answer(frame, channel)))

    async def _answer(self, frame: protocol.QueryFrame, channel: ReplyChannel) -> None:
        job = await self._pipeline.prepare(frame, channel)
        if job is not None:
            await self._pipeline.complete(channel, self._run(job, channel))

    async def _run(self, job: Job, channel: ReplyChannel) -> Outcome:
        if not self._tracking_installed:
            runtime.install_task_tracking(asyncio.get_running_loop())
            self._tracking_installed = True
        if job.request.capture_output:
            output.install()
        if not job.timeout:
            return await runtime.run_job(self.cache, job, self._connection, channel, self.guard)
        # The timeout is answered at its deadline by the timer itself, not by the run: code that swallows
        # CancelledError (an `await` in a `try/except BaseException` loop) would never let the run end.
        task = asyncio.current_task()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self.timeouts += 1
            self._pipeline.finish(channel, error=timeout_error(job.timeout))
            if task is not None:
                task.cancel()

        timer = asyncio.get_running_loop().call_later(job.timeout, expire)
        try:
            return await runtime.run_job(self.cache, job, self._connection, channel, self.guard)
        except asyncio.CancelledError:
            if expired:     # answered already: what the run ends with is not sent
                raise timeout_error(job.timeout) from None
            raise
        finally:
            timer.cancel()

    def stats(self) -> EngineStats:
        # no workers and no queue: their figures stay None; the connector's own loop can always run code
        cache = self.cache
        return EngineStats(timeouts=self.timeouts, cache_hits=cache.hits, cache_misses=cache.misses,
                           cache_size=len(cache), cache_capacity=cache.capacity)

    async def close(self) -> None:
        self.cache.clear()

    async def retire(self) -> None:
        await self.close()

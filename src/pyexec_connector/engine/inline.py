"""Inline engine: user code runs on the connector's own event loop, as upstream does.

Not protected: code that blocks or loops forever stalls the whole connector (a timeout only ends code
that awaits), and a crash in a C extension ends it. SystemExit is caught. Use it only for trusted,
quick code."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from contextvars import copy_context
from typing import Any

from .. import protocol
from ..cache import CodeCache
from ..config import SourceConfig
from ..reply import ReplyChannel
from ..request import QueryRequest
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
        pipeline = self._pipeline
        try:
            request = pipeline.request(frame)
            if request.script is not None:      # its document is fetched first: that awaits
                pipeline.track(asyncio.ensure_future(self._fetch_and_start(request, channel)))
                return
            job = pipeline.make_job(request, request.code, request.code)
        except Exception as exc:   # noqa: BLE001 - each is answered
            pipeline.fail(channel, exc)
            return
        self._start(job, channel)

    async def _fetch_and_start(self, request: QueryRequest, channel: ReplyChannel) -> None:
        try:
            job = await self._pipeline.job(request)
        except (Exception, asyncio.CancelledError) as exc:   # noqa: BLE001 - each is answered
            self._pipeline.fail(channel, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._start(job, channel)

    def _start(self, job: Job, channel: ReplyChannel) -> None:
        """Every inline run starts here. Code that cannot await runs to its end in this very step (a task
        per query would only be made, stepped once and dropped); code that awaits gets a task of its own,
        cancellable and under its timeout. Either way its end goes through the same Pipeline calls."""
        pipeline = self._pipeline
        try:
            if job.request.capture_output:
                output.install()
            # in a context of its own, as in a task: what the code sets in a ContextVar ends with it
            started = copy_context().run(runtime.start_job, self.cache, job, self._connection, channel, self.guard)
        except (Exception, asyncio.CancelledError) as exc:   # noqa: BLE001 - each is answered
            pipeline.fail(channel, exc)     # a CancelledError the code raised: "stopped", as in a task
            return
        if isinstance(started, Outcome):
            pipeline.finish(channel, started)
            return
        if not self._tracking_installed:
            runtime.install_task_tracking(asyncio.get_running_loop())
            self._tracking_installed = True
        task = asyncio.ensure_future(self._complete(job, channel, started))
        # a task cancelled before its first step never awaits the run: closed, it is not warned about
        task.add_done_callback(lambda _: started.close())
        pipeline.track(task)

    async def _complete(self, job: Job, channel: ReplyChannel, running: Coroutine[Any, Any, Outcome]) -> None:
        await self._pipeline.complete(channel, self._await(job, channel, running))

    async def _await(self, job: Job, channel: ReplyChannel, running: Awaitable[Outcome]) -> Outcome:
        if not job.timeout:
            return await running
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
            return await running
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

"""Inline engine: user code runs on the connector's own event loop, as upstream does.

Not protected: code that blocks, loops forever or exits the interpreter affects the whole connector
(SystemExit is caught). Use it only for trusted, quick code."""
from __future__ import annotations

import asyncio
from time import perf_counter
from typing import Any

from ..cache import CodeCache
from ..reply import ReplyChannel
from . import runtime
from .base import Job, Outcome


class InlineEngine:
    def __init__(self, connection: Any, cache_capacity: int = 128):
        self._connection = connection
        self.cache = CodeCache(cache_capacity)
        self._tracking_installed = False

    def reconfigure(self, cache_capacity: int) -> None:
        old = self.cache
        self.cache = CodeCache(cache_capacity)
        # hits and misses count over the process's life (/metrics counters never go back)
        self.cache.hits, self.cache.misses = old.hits, old.misses

    async def run(self, job: Job, channel: ReplyChannel) -> Outcome:
        if not self._tracking_installed:
            runtime.install_task_tracking(asyncio.get_running_loop())
            self._tracking_installed = True
        cache = self.cache
        info: dict[str, Any] | None = {"name": job.request.cache_key} if job.runtime_info else None
        code = runtime.resolve_code(cache, job, info)
        run_globals = runtime.make_globals(job, self._connection, channel.context)

        tracker = runtime.RunTracker()
        token = runtime.CURRENT_RUN.set(tracker)
        started = perf_counter()
        try:
            await runtime.execute(code, run_globals)
        finally:
            runtime.CURRENT_RUN.reset(token)
        if job.request.code_handles_return:
            try:
                await runtime.await_code_reply(tracker, channel.done_future())
            finally:
                if not channel.terminated:
                    tracker.cancel_all()
            return Outcome()
        executed = perf_counter() - started
        results = runtime.results_json(run_globals, job.request.limit_return_to)
        if info is not None:
            info.update(executionTime=executed, currentCacheSize=len(cache), cacheCapacity=cache.capacity)
        return Outcome(results, info)

    async def close(self) -> None:
        self.cache.clear()

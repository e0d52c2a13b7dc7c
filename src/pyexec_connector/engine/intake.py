"""What ready workers say, taken in order (the process engine's side of every worker pipe).

A worker's handle hands each read's messages here (`take`), as they arrive; each goes to the QueryBook at
once unless it must wait: a health change (awaited before the code's next reply goes out), or anything
while the link's outbox is full (nothing is taken from workers while the link is backed up). From the
first that must wait, that worker's messages queue in its backlog, its reading paused (its writes, and
so the code's awaited sends, wait too: flow control reaches user code), and a task takes them in order.
When every message of a read is taken, the link writes at once: a worker's answers go out in the step
they came in, and only then are the answered runs ended (QueryBook.end_answered), off the replies' path."""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from ..connection import Health
from .handle import WorkerHandle
from .messages import ACKED, HealthChanged
from .queries import LinkOutlet, QueryBook

log = logging.getLogger("pyexec_connector.engine.process")


class Intake:
    def __init__(self, source_name: str, queries: QueryBook, link: LinkOutlet, health: Health):
        self.source_name = source_name
        self.queries = queries
        self._link = link
        self._health = health

    def take(self, worker: WorkerHandle, messages: list[Any]) -> None:
        """One read's messages from `worker` (WorkerHandle.serve). Raises what the QueryBook raises for a
        message the worker may not send: the worker broke the protocol."""
        backlog = worker.backlog
        link = self._link
        link.write_soon()
        try:
            if not backlog:
                for i, message in enumerate(messages):
                    if not self._take_now(worker, message):
                        backlog.extend(itertools.islice(messages, i, None))
                        worker.pause_reading()
                        worker.backlog_task = asyncio.ensure_future(self._take_backlog(worker))
                        break
            else:       # read before its reading paused: after what waits
                backlog.extend(messages)
        finally:
            link.write_now()
            self.queries.end_answered()     # after the write: a reply's bookkeeping is off its path
            if worker.over_pace:
                self.queries.spill(worker)

    def _take_now(self, worker: WorkerHandle, message: Any) -> bool:
        """The message handled now; False (nothing done) when it must wait (_take_later)."""
        if message is ACKED:
            return True
        if type(message) is HealthChanged or not self._link.is_drained():
            return False
        self.queries.handle(worker, message)
        return True

    async def _take_later(self, worker: WorkerHandle, message: Any) -> None:
        if type(message) is HealthChanged:
            try:
                await self._health.declare(bool(message.healthy))
            except Exception:   # noqa: BLE001 - a failing health listener is not the worker's fault
                log.exception("source %s: declaring health failed", self.source_name)
            return
        await self._link.drained()
        self.queries.handle(worker, message)
        await self._link.drained()     # the link is slow: stop reading, and the worker's writes wait

    async def _take_backlog(self, worker: WorkerHandle) -> None:
        backlog = worker.backlog
        while backlog:
            message = backlog[0]
            try:
                if not self._take_now(worker, message):
                    await self._take_later(worker, message)
            except Exception as exc:   # noqa: BLE001 - the worker cannot be trusted any more
                backlog.clear()
                worker.broke(exc)
                return
            finally:
                self.queries.end_answered()
            backlog.popleft()
        worker.resume_reading()

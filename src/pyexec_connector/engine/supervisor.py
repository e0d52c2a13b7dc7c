"""Supervision of a pool's workers, idle and busy alike: each one silent for a while is pinged over its
pipe, and engine/liveness.py judges the answer. A worker that does not answer while running queries
takes no new ones (those sent to it that it did not read in time went to another worker already: see
ProcessEngine._take_back); one that does not
answer and runs nothing is killed, its end then handled by the pool like any other (WorkerPool._ended)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .liveness import LivenessPolicy, Verdict

if TYPE_CHECKING:
    from .handle import PoolEvents, WorkerHandle

log = logging.getLogger("pyexec_connector.engine.process")

TICK = 1.0      # seconds between checks (each worker is pinged after LivenessPolicy.interval of silence)


class Supervisor:
    def __init__(self, source_name: str, workers: Callable[[], Sequence[WorkerHandle]], events: PoolEvents,
                 policy: LivenessPolicy = LivenessPolicy()):
        self.source_name = source_name
        self.policy = policy
        self._workers = workers                 # the pool's supervised workers, now
        self._events = events
        self.wedged = 0                         # workers killed for not answering a ping

    async def run(self, closing: asyncio.Event) -> None:
        """Check every TICK until `closing` is set; a failing check is logged and the next one runs."""
        while not closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), TICK)
            if closing.is_set():
                return
            try:
                self.check()
            except Exception:   # noqa: BLE001 - supervision must go on
                log.exception("source %s: checking workers' liveness failed", self.source_name)

    def check(self) -> None:
        now = time.monotonic()
        reading = self._events.reading()
        for worker in self._workers():
            if worker.pipe is None:
                continue
            if not reading:       # its answers wait unread: its silence says nothing
                worker.last_heard, worker.pinged_at = now, None
                continue
            verdict = self.policy.verdict(now, worker.last_heard, worker.pinged_at, len(worker.inflight))
            if verdict is Verdict.PING:
                worker.ping()
            elif verdict is Verdict.SILENT:
                if not worker.stalled:
                    worker.stalled = True      # the dispatcher passes it by until it writes again
                    log.warning("source %s: worker %d has not answered for %.1f s while running queries; "
                                "no new queries go to it until it does", self.source_name, worker.index,
                                now - worker.last_heard)
            elif verdict is Verdict.WEDGED:
                self.wedged += 1
                log.warning("source %s: worker %d ran no query and did not answer a ping for %.1f s: something "
                            "its code left behind blocks it; replacing it", self.source_name, worker.index,
                            now - worker.last_heard)
                worker.kill(f"it did not answer a liveness ping within {self.policy.timeout:g} s")


"""One source's engines for per-script environments: one process engine per environment in use, made on
its first query, its workers forked from a zygote started with the environment's interpreter (the
registry keys zygotes by interpreter and preload list), and closed again once it has been idle for
workerIdleSeconds: an environment nobody uses holds no process and no lease (so it can be evicted)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

from ..config import SourceConfig
from ..engine.base import Engine
from ..reply import ReplyChannel
from .manager import EnvironmentManager
from .metadata import block_text
from .store import Environment, Lease

log = logging.getLogger(__name__)

class EnvironmentGone(Exception):
    """The environment was removed (pruned) between its lookup and its use: the caller asks again."""


@dataclasses.dataclass(eq=False)
class _InUse:
    engine: Engine
    lease: Lease
    idle_seconds: float
    last_query: float = 0.0        # loop time of its last query


def environment_config(config: SourceConfig) -> SourceConfig:
    """The source's configuration for an environment's engine: its workers start as queries come and end
    when idle (minWorkers 0), so an environment nobody uses holds no worker; and they are processes, also
    for an inline source: the environment is another interpreter."""
    return config.model_copy(update={"minWorkers": 0, "executionMode": "process"})


class EnvironmentEngines:
    """The engines of one source's environments in use. The session makes an engine (`open`) when
    `submit` finds none; this class routes queries to them and retires the idle ones."""

    def __init__(self, source_name: str, manager: EnvironmentManager):
        self.source_name = source_name
        self._manager = manager
        self._engines: dict[str, _InUse] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._retiring: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._engines)

    def submit(self, environment: Environment, frame: Any, channel: ReplyChannel) -> bool:
        """The query to the environment's engine; False when it has none (see `lease` and `open`)."""
        in_use = self._engines.get(environment.key)
        if in_use is None:
            return False
        in_use.last_query = asyncio.get_running_loop().time()
        in_use.engine.submit(frame, channel)
        return True

    def submit_known(self, code: str, frame: Any, channel: ReplyChannel) -> bool:
        """Code whose block was seen before goes to its environment's running engine at once, as code
        without a block goes to the source's: no task, no parse. False: the caller takes the full way (a
        new block, or an environment without an engine now)."""
        block = block_text(code)
        environment = self._manager.known(block) if block is not None else None
        # an engine holds its environment's lease: the environment is on disk while the engine lives
        return environment is not None and self.submit(environment, frame, channel)

    def lease(self, environment: Environment) -> Lease:
        """The environment held in use, for an engine about to be opened; raises EnvironmentGone."""
        lease = self._manager.lease(environment)
        if lease is None:
            raise EnvironmentGone(environment.key)
        return lease

    def open(self, environment: Environment, engine: Engine, lease: Lease, idle_seconds: float) -> None:
        """Queries for `environment` go to `engine` from now on, until it has been idle `idle_seconds`."""
        self._engines[environment.key] = _InUse(engine, lease, idle_seconds)
        log.info("source %s: running scripts in environment %s (%s)", self.source_name, environment.key,
                 ", ".join(environment.requirements))
        self._watch(idle_seconds)

    def _watch(self, idle_seconds: float) -> None:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(idle_seconds / 2, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for key, in_use in list(self._engines.items()):
            # retiring lets what it still runs finish: a long query does not keep its engine from retiring
            if now - in_use.last_query >= in_use.idle_seconds:
                log.info("source %s: environment %s idle for %g s: its engine stops", self.source_name, key,
                         in_use.idle_seconds)
                self._retire(self._engines.pop(key))
        if self._engines:
            self._watch(min(e.idle_seconds for e in self._engines.values()))

    def _retire(self, in_use: _InUse) -> None:
        """The engine finishes what it has, then closes; then the environment's lease is given back."""
        async def retire() -> None:
            try:
                await in_use.engine.retire()
            finally:
                in_use.lease.release()
        task = asyncio.ensure_future(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def retire_all(self) -> None:
        """A new configuration: engines in use finish what they run and stop; the next query makes anew."""
        for in_use in self._engines.values():
            self._retire(in_use)
        self._engines.clear()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        engines, self._engines = list(self._engines.values()), {}
        for in_use in engines:
            with contextlib.suppress(Exception):
                await in_use.engine.close()
            in_use.lease.release()
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)

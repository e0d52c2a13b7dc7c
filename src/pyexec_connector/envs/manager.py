"""EnvironmentManager: the environment for a requirement set, installed once and shared.

A key's first user starts its install as a task; everyone else who asks meanwhile awaits the same task,
each within their own time (a caller that gives up does not stop an install others wait for). A failed
install is reported to everyone who waited and is not remembered: the next caller tries again. After
each install the cache is brought under its size bound, least recently used first, sparing what is in
use (store.Lease) here or in another process."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cachetools import LRUCache

from .installer import InstallFailed, InstallSettings, find_uv, install
from .metadata import ScriptMetadata
from .requirements import EnvironmentSpec, plan
from .runtime import RuntimeMissing, RuntimeSet, runtime_set, wheelhouse
from .store import Environment, EnvironmentStore, Lease

if TYPE_CHECKING:
    from ..config import ServerConfig

RECENT_BLOCKS = 256          # script blocks remembered with their environment
MAX_RECENT_BLOCK = 4096      # characters: a longer block is not remembered (the cache stays ~1 MiB at most)
TOUCH_INTERVAL = 60.0        # seconds between updates of an environment's last use on disk

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EnvironmentSettings:
    """The operator's settings (server.config: environmentsDir, environmentsMaxMB, packageIndex,
    packageFindLinks, packageSourceBuilds)."""

    directory: Path
    max_bytes: int = 0                      # 0: no bound
    install: InstallSettings = InstallSettings()

    @classmethod
    def from_config(cls, config: ServerConfig) -> EnvironmentSettings:
        return cls(Path(config.environments_dir), config.environments_max_mb * 1024 * 1024,
                   InstallSettings(config.package_index, tuple(config.package_find_links),
                                   config.package_source_builds))


@dataclasses.dataclass
class EnvironmentFigures:
    """What /metrics reports."""

    installs: int = 0           # environments installed by this process
    hits: int = 0               # requests answered by an environment already there
    failures: int = 0           # installs that failed
    install_seconds: float = 0.0
    cache_bytes: int = 0        # environments on disk, as of the last install or eviction


class EnvironmentManager:
    def __init__(self, settings: EnvironmentSettings, *, runtime: RuntimeSet | None = None,
                 uv: str | None = None):
        self.settings = settings
        self.store = EnvironmentStore(settings.directory)
        self.uv = uv or find_uv()               # InstallerMissing now, not at the first query
        self._runtime = runtime
        self._installing: dict[str, asyncio.Task[Environment]] = {}
        self.figures = EnvironmentFigures()
        # a script block's text -> its environment, for the queries after the first (see `known`)
        self._recent: LRUCache[str, Environment] = LRUCache(maxsize=RECENT_BLOCKS)
        self._touched: dict[str, float] = {}

    @property
    def runtime(self) -> RuntimeSet:
        if self._runtime is None:
            self._runtime = runtime_set()
        return self._runtime

    def plan(self, metadata: ScriptMetadata) -> EnvironmentSpec:
        """The spec of a script's environment; raises MetadataError, PythonMismatch or Conflict."""
        runtime = self.runtime
        return plan(metadata, runtime.pins, runtime.fingerprint)

    def known(self, block: str) -> Environment | None:
        """The environment a block (metadata.block_text) was last found to need: a repeated script costs a
        dictionary lookup, not a parse, a plan and a read. It may have been removed since (by a prune in
        another process): a lease on it then fails, and the caller `forget`s the block and asks afresh."""
        environment = self._recent.get(block)
        if environment is not None:
            self.figures.hits += 1
            self._touch(environment)
        return environment

    def forget(self, block: str) -> None:
        self._recent.pop(block, None)

    def remember(self, block: str, environment: Environment) -> None:
        if len(block) <= MAX_RECENT_BLOCK:
            self._recent[block] = environment

    def _touch(self, environment: Environment) -> None:
        """Mark it used (its record's mtime: LRU order for eviction), at most every TOUCH_INTERVAL."""
        now = time.monotonic()
        if now - self._touched.get(environment.key, -TOUCH_INTERVAL) >= TOUCH_INTERVAL:
            self._touched[environment.key] = now
            self.store.touch(environment)

    async def ensure(self, spec: EnvironmentSpec) -> Environment:
        """The environment for `spec`: found, or installed (once, however many ask). Raises InstallFailed."""
        found = self.store.find(spec.key)
        if found is not None:
            self.figures.hits += 1
            self._touch(found)
            return found
        task = self._installing.get(spec.key)
        if task is None:
            task = asyncio.ensure_future(self._install(spec))
            self._installing[spec.key] = task
            task.add_done_callback(functools.partial(self._installed, spec.key))
        return await asyncio.shield(task)

    def _installed(self, key: str, task: asyncio.Task[Environment]) -> None:
        self._installing.pop(key, None)
        if not task.cancelled():
            task.exception()     # retrieved: its waiters may all have given up (their timeouts)

    @property
    def installing(self) -> int:
        """Installs running now."""
        return len(self._installing)

    async def _install(self, spec: EnvironmentSpec) -> Environment:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.install.timeout
        try:
            fd = await self.store.exclusive(spec.key, deadline)
        except (TimeoutError, OSError) as exc:
            self.figures.failures += 1
            raise InstallFailed(f"{exc} (environmentsDir {self.settings.directory})") from None
        try:
            found = self.store.find(spec.key)       # another process installed it while we waited
            if found is not None:
                self.figures.hits += 1
                return found
            try:
                try:
                    wheels = await asyncio.to_thread(wheelhouse, self.runtime, self.settings.directory)
                    seconds = await install(spec, self.store.path(spec.key), wheels, self.settings.install,
                                            self.store.cache, self.uv)
                    environment = self.store.complete(spec, seconds)
                except (OSError, RuntimeMissing) as exc:     # a full disk, a broken installation
                    raise InstallFailed(f"{type(exc).__name__}: {exc}") from None
            except InstallFailed as exc:
                self.figures.failures += 1
                log.warning("installing %s failed: %s", ", ".join(spec.requirements) or "(no requirements)",
                            exc.reason)
                raise
            self.figures.installs += 1
            self.figures.install_seconds += seconds
            log.info("installed an environment for %s in %.2f s (%s)", ", ".join(spec.requirements),
                     seconds, environment.path)
        finally:
            os.close(fd)
        await asyncio.to_thread(self.evict, frozenset({spec.key}))
        return environment

    def lease(self, environment: Environment) -> Lease | None:
        """Hold the environment in use (see store.Lease); None if it was removed meanwhile."""
        return self.store.lease(environment)

    def evict(self, keep: frozenset[str] = frozenset()) -> list[Environment]:
        """Bring the cache under environmentsMaxMB (nothing when it is 0)."""
        removed = self.store.evict(self.settings.max_bytes, keep) if self.settings.max_bytes else []
        for entry in removed:
            log.info("removed the least recently used environment %s (%s)", entry.key,
                     ", ".join(entry.requirements))
        self.figures.cache_bytes = self.store.total_bytes()
        return removed

    async def close(self) -> None:
        """Stop installs still running (their folders are removed; nothing half-made counts)."""
        tasks = list(self._installing.values())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)

"""The Connector: one SourceSession per source, started and stopped together. The lifecycle lives here:
start-up (sessions, HTTP endpoints, TCP probe), serving, and the graceful shutdown."""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from . import compat
from .config import ServerConfig
from .connection import Health
from .engine.base import Engine
from .errors import ConfigError
from .figures import engine_stats
from .health import HttpEndpoints, Metrics, TcpProbe
from .link import Backoff
from .session import SourceSession

if TYPE_CHECKING:
    from .envs.manager import EnvironmentManager

log = logging.getLogger(__name__)

KUBERNETES_ENV = "KUBERNETES_SERVICE_HOST"


class Connector:
    def __init__(self, config: ServerConfig, *, backoff_initial: float = 1.0, backoff_max: float = 60.0,
                 handshake_timeout: float | None = None, environ: Mapping[str, str] | None = None):
        self.config = config
        self.health = Health()
        self._config_problem: ConfigError | None = None
        self.environments = self._environments(config)
        # the environments' collector (and the modules it reads) only with the feature on
        manager = self.environments
        self.metrics = Metrics(lambda: self.sessions, environments=(lambda: manager.figures) if manager else None)
        secret = config.reconnect_secret or uuid.uuid4().hex
        self.sessions: dict[str, SourceSession] = {
            name: SourceSession(name, config, reconnect_secret=secret, health=self.health,
                                backoff=Backoff(backoff_initial, backoff_max),
                                handshake_timeout=handshake_timeout, figures=self.metrics.figures(name),
                                environments=self.environments)
            for name in config.sources
        }
        self.http = HttpEndpoints(self, config.metrics_port) if config.metrics_port else None
        self.probe = TcpProbe(config.tcp_probe_port)
        self.health.listeners.append(self.probe.set)
        environ = os.environ if environ is None else environ
        self._under_kubernetes = bool(environ.get(KUBERNETES_ENV))
        self.shutting_down = False
        self._stop = asyncio.Event()
        self._closed = False

    def _environments(self, config: ServerConfig) -> EnvironmentManager | None:
        """The per-script environments' manager, with scriptDependencies on (a problem is raised by run())."""
        if not config.script_dependencies:
            return None
        try:
            from .envs.manager import EnvironmentManager, EnvironmentSettings
            return EnvironmentManager(EnvironmentSettings.from_config(config))
        except Exception as exc:  # noqa: BLE001 - uv missing (the envs extra): said as a configuration error
            self._config_problem = ConfigError(f"is true, but {exc}", key="scriptDependencies")
            return None

    async def run(self) -> None:
        """Serve every source until `stop()`, then shut down gracefully. A fatal link error (bad token,
        failOnConnectionError) stops the rest and is raised."""
        if self._config_problem is not None:
            raise self._config_problem
        if self.environments is not None:
            manager = self.environments
            log.info("scriptDependencies on: environments in %s (at most %d MB)", manager.store.directory,
                     manager.settings.max_bytes // 2**20)
            await asyncio.to_thread(manager.evict)      # the cache's size, for /metrics, and under its bound
        log.info("connecting %d source(s) to %s: %s", len(self.sessions), self.config.websocket_url,
                 ", ".join(self.sessions))
        compat.report_missing()
        links: dict[asyncio.Task, str] = {}
        stopper = asyncio.create_task(self._stop.wait())
        try:
            # The endpoints and the probe first: /readyz answers 503 while the sources connect.
            if self.http is not None:
                await self.http.start()
            if self._under_kubernetes:        # as upstream: healthy from the start (is_healthy() is True)
                log.info("running under Kubernetes: declaring healthy (TCP probe on port %d)",
                         self.config.tcp_probe_port)
                await self.health.declare(True)
            links = {asyncio.create_task(s.run(), name=f"source-{n}"): n for n, s in self.sessions.items()}
            pending = set(links) | {stopper}
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    failure = task.exception() if task is not stopper else None
                    if failure is not None:
                        raise failure
                if stopper in done or not (pending - {stopper}):
                    return
        finally:
            stopper.cancel()
            await self.close()
            for task in links:
                task.cancel()
            await asyncio.gather(*links, return_exceptions=True)

    def stop(self) -> None:
        """Begin the graceful shutdown (what SIGTERM and SIGINT do)."""
        if not self._stop.is_set():
            log.info("stopping: no new queries; in-flight queries get up to %g s",
                     self.config.shutdown_grace_seconds)
        self._stop.set()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every source is connected and configured."""
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(s.link.wait_ready() for s in self.sessions.values()))

    @property
    def ready(self) -> bool:
        return not self.shutting_down and all(s.link.ready for s in self.sessions.values())

    def not_ready(self) -> dict[str, str]:
        """The sources that cannot take queries now, and why (their link state, or shutting down)."""
        if self.shutting_down:
            return {name: "shutting down" for name in self.sessions}
        return {name: s.link.state.value for name, s in self.sessions.items() if not s.link.ready}

    def health_problems(self) -> list[str]:
        """Why the process is not healthy (empty when it is): a script declared it unhealthy, or an
        engine says it cannot run code."""
        problems = []
        if self.health.declared is False:
            problems.append("declared unhealthy (connector_connection.declare_unhealthy())")
        seen: set[int] = set()
        for name, session in self.sessions.items():
            engine: Engine | None = session.engine
            if engine is None or id(engine) in seen:
                continue
            seen.add(id(engine))
            if not engine_stats(engine).can_run:
                problems.append(f"source {name}: no engine worker alive")
        return problems

    async def close(self) -> None:
        """The graceful shutdown: refuse new queries ("shutting down"), let in-flight ones finish within
        shutdownGraceSeconds, answer the rest with an error, send what is queued, close every websocket
        normally, then engines, HTTP sessions, endpoints and the probe."""
        if self._closed:
            return
        self._closed = True
        self.shutting_down = True
        for session in self.sessions.values():
            session.stop_accepting()
        running = sum(s.running for s in self.sessions.values())
        if running:
            log.info("waiting up to %g s for %d in-flight quer%s", self.config.shutdown_grace_seconds, running,
                     "y" if running == 1 else "ies")
        left = await asyncio.gather(*(s.finish(self.config.shutdown_grace_seconds)
                                      for s in self.sessions.values()))
        if sum(left):
            log.warning("shutdown grace (%g s) over: answering %d still-running quer%s with an error",
                        self.config.shutdown_grace_seconds, sum(left), "y" if sum(left) == 1 else "ies")
        await asyncio.gather(*(s.close() for s in self.sessions.values()), return_exceptions=True)
        if self.environments is not None:
            await self.environments.close()
        if self.http is not None:
            await self.http.stop()
        await self.probe.stop()

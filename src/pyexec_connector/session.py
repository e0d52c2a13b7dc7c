"""One source: its link, its configuration, its engine and documents, and the handling of each query."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from . import errors, protocol
from .config import ServerConfig, SourceConfig, parse_source_config
from .connection import ConnectorConnection, Health
from .documents import DocumentStore
from .engine import Engine
from .engine.inline import InlineEngine
from .engine.pipeline import Pipeline, not_accepting, stopped, timeout_error
from .engine.process import ProcessEngine
from .errors import QueryError
from .link import Backoff, LinkState, SourceLink
from .querylog import QueryFigures, QueryLog
from .reply import ReplyChannel, notification_builder

if TYPE_CHECKING:
    from .envs.engines import EnvironmentEngines
    from .envs.manager import EnvironmentManager

log = logging.getLogger(__name__)
# where a PEP 723 block starts (envs/metadata.py): code without it never reaches the environment layer
SCRIPT_BLOCK = "# /// script"


class SourceSession:
    def __init__(self, source_name: str, config: ServerConfig, *, reconnect_secret: str, health: Health,
                 backoff: Backoff | None = None, handshake_timeout: float | None = None,
                 figures: QueryFigures | None = None, environments: EnvironmentManager | None = None):
        """`figures`: where this source's query metrics go (health.Metrics.figures); its own when None."""
        self.source_name = source_name
        # per-script environments (scriptDependencies on), shared by every source of the connector
        self.environments = environments
        self._environment_engines: EnvironmentEngines | None = None
        self.server_config = config
        self.source_config = SourceConfig()
        link_options: dict[str, Any] = {"backoff": backoff}
        if handshake_timeout is not None:
            link_options["handshake_timeout"] = handshake_timeout
        self.link = SourceLink(source_name, config, self, reconnect_secret=f"{source_name}_{reconnect_secret}",
                               on_state=self._state_changed, **link_options)
        self._send = self.link.send                         # each query's ReplyChannel sends through it
        self._max_bytes = config.max_message_bytes
        self.connection = ConnectorConnection(
            source_name, self.link.send, self.link.drained,
            notification_builder(source_name, config.max_message_bytes), config.public_properties, health)
        self.documents = DocumentStore(config.rest_base, config.auth_token, ssl=config.ssl_context(),
                                       cache_capacity=self.source_config.codeCacheSize,
                                       timeout=config.document_timeout, max_bytes=config.max_document_bytes)
        self.health = health
        self.queries = QueryLog(source_name, figures)     # every query's end: count, log line, metrics
        # with scriptDependencies off, a document declaring dependencies is refused as it arrives
        self.pipeline = Pipeline(source_name, self.documents if environments is not None
                                 else _DependenciesOff(self.documents), self.queries)
        self.engine: Engine | None = None          # built by the first configure
        self._retiring: dict[asyncio.Task, Engine] = {}   # engines a reconfigure replaced, finishing up
        self.accepting = True
        self.configured = asyncio.Event()

    @property
    def queries_answered(self) -> int:
        """Queries ended (each with its terminal reply) since the session started."""
        return self.queries.answered

    @property
    def in_flight(self) -> set[asyncio.Future]:
        """The tasks of queries running (a relayed query has none: see `running`)."""
        return self.pipeline.in_flight

    @property
    def running(self) -> int:
        """Queries taken and not answered yet (running, or waiting for a worker)."""
        return len(self.pipeline.unanswered)

    @property
    def environments_in_use(self) -> int:
        """Per-script environments whose engines run for this source now (each stops when idle)."""
        return len(self._environment_engines) if self._environment_engines is not None else 0

    def _state_changed(self, source: str, state: LinkState) -> None:
        log.debug("source %s: link %s", source, state.value)

    # ---- LinkHandler -----------------------------------------------------------------------
    def on_configure(self, config: Any) -> None:
        previous = self.source_config
        self.source_config = parse_source_config(config, self.source_name)
        self.pipeline.config = self.source_config
        self._rebuild_engine(previous)
        if self._environment_engines is not None:
            self._environment_engines.retire_all()
        self.documents.reconfigure(self.source_config.codeCacheSize)
        self.configured.set()

    def _rebuild_engine(self, previous: SourceConfig) -> None:
        """Same pool shape: the engine reconfigures in place (workers and their module state stay).
        A new shape: a new engine takes new queries; the old one finishes what it has, then closes."""
        config = self.source_config
        if self.engine is not None and config.pool_shape == previous.pool_shape:
            self.engine.reconfigure(config)
            return
        old = self.engine
        self.engine = self._make_engine(config)
        log.info("source %s: executing code %s", self.source_name,
                 "inline, on the connector's loop (not protected)" if config.executionMode == "inline"
                 else f"in worker processes: {config.min_worker_count} warm, up to {config.worker_count}")
        if old is not None:
            task = asyncio.create_task(old.retire())
            self._retiring[task] = old
            task.add_done_callback(self._retiring.pop)

    def _make_engine(self, config: SourceConfig, python: str | None = None) -> Engine:
        """`python`: a per-script environment's interpreter, for its own process engine."""
        if config.executionMode == "inline" and python is None:
            return InlineEngine(self.pipeline, self.connection, config)
        return ProcessEngine(config, self.pipeline, self.link, self.health, source_name=self.source_name,
                             server_config=self.server_config.public_properties,
                             max_message_bytes=self.server_config.max_message_bytes,
                             worker_credentials=self.server_config.worker_credentials, python=python)

    def on_unreadable_query(self, reply_address: str, error: QueryError) -> None:
        """A query frame that could not be parsed (cut off, too large) but names its reply address."""
        channel = self._channel(reply_address)
        self.pipeline.finish(channel, error=error)

    def on_query(self, frame: protocol.QueryFrame) -> None:
        """One query: the engine takes it from here and ends it through the pipeline."""
        channel = ReplyChannel(self._send, frame.reply_address, self.source_name, self._max_bytes)
        self.pipeline.begin(channel)
        engine = self.engine
        if not self.accepting or engine is None:
            self.pipeline.finish(channel, error=not_accepting() if not self.accepting else _not_configured())
            return
        params = frame.params
        if type(params) is dict:
            code = params.get("code")
            if type(code) is str and SCRIPT_BLOCK in code:
                engines = self._environment_engines
                try:
                    if engines is not None and engines.submit_known(code, frame, channel):
                        return
                except Exception as exc:   # noqa: BLE001 - as for the engine below
                    self._failed(frame, channel, exc)
                    return
                self.pipeline.track(asyncio.ensure_future(self._environment_query(frame, channel, engine)))
                return
            if self.environments is not None and code is None and type(params.get("script")) is str:
                self.pipeline.track(asyncio.ensure_future(self._environment_query(frame, channel, engine)))
                return
        try:
            engine.submit(frame, channel)
        except Exception as exc:   # noqa: BLE001 - an engine bug must not cost the query its reply
            self._failed(frame, channel, exc)

    def _submit(self, engine: Engine, frame: protocol.QueryFrame, channel: ReplyChannel) -> None:
        try:
            engine.submit(frame, channel)
        except Exception as exc:   # noqa: BLE001 - an engine bug must not cost the query its reply
            self._failed(frame, channel, exc)

    def _failed(self, frame: protocol.QueryFrame, channel: ReplyChannel, exc: Exception) -> None:
        log.exception("source %s: the engine failed taking query %s", self.source_name, frame.reply_address,
                      exc_info=exc)
        self.pipeline.finish(channel, error=QueryError(errors.INTERNAL_ERROR, "The connector failed while "
                                                       "answering: {0}", [f"{type(exc).__name__}: {exc}"]))

    async def _environment_query(self, frame: protocol.QueryFrame, channel: ReplyChannel, engine: Engine) -> None:
        """A query whose script may declare dependencies: its environment found or installed (within the
        query's own timeout), then the query to that environment's engine; a script without a block goes
        to `engine` as any other."""
        from .envs import gate
        from .envs.engines import EnvironmentGone
        limit = _query_timeout(frame.params, self.source_config.executionTimeout)
        try:
            async with asyncio.timeout(limit):
                code, name = frame.params.get("code"), frame.params.get("script")
                text = code if code is not None else (await self.documents.get(name)).text
                environment = await gate.environment_for(text, self.environments)
            if environment is None:
                # the source's engine of now: a reconfigure may have replaced it during the install
                self._submit(self.engine if self.engine is not None else engine, frame, channel)
                return
            if self.source_config.executionMode != "process":
                raise QueryError(errors.DEPENDENCIES_INLINE, "A script with dependencies runs in worker "
                                 "processes: the source's executionMode is {0}.", [self.source_config.executionMode])
            self._run_in(environment, frame, channel)
        except QueryError as exc:
            self.pipeline.finish(channel, error=exc)
        except TimeoutError:
            self.pipeline.finish(channel, error=timeout_error(limit))
        except EnvironmentGone:
            self.pipeline.finish(channel, error=QueryError(errors.INSTALL_FAILED, "The script's environment was "
                                                           "removed while the query started; send it again."))
        except asyncio.CancelledError:
            self.pipeline.finish(channel, error=stopped())
            raise
        except Exception as exc:   # noqa: BLE001 - a bug must not cost the query its reply
            self._failed(frame, channel, exc)

    def _run_in(self, environment: Any, frame: protocol.QueryFrame, channel: ReplyChannel) -> None:
        """The query to the environment's engine, made now when it has none. Raises EnvironmentGone."""
        from .envs.engines import EnvironmentEngines, environment_config
        if self._environment_engines is None:
            assert self.environments is not None
            self._environment_engines = EnvironmentEngines(self.source_name, self.environments)
        engines = self._environment_engines
        if engines.submit(environment, frame, channel):
            return
        lease = engines.lease(environment)
        try:
            config = environment_config(self.source_config)
            engine = self._make_engine(config, python=str(environment.python))
        except BaseException:
            lease.release()
            raise
        engines.open(environment, engine, lease, config.workerIdleSeconds)
        engines.submit(environment, frame, channel)

    def _channel(self, reply_address: str) -> ReplyChannel:
        channel = ReplyChannel(self._send, reply_address, self.source_name, self._max_bytes)
        self.pipeline.begin(channel)
        return channel

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        await self.link.run()

    def stop_accepting(self) -> None:
        """From now on every new query is answered at once with a "shutting down" error."""
        self.accepting = False

    async def finish(self, timeout: float) -> int:
        """Let in-flight queries finish for up to `timeout` seconds. Returns how many are still running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight and loop.time() < deadline:
            await asyncio.wait(set(self.in_flight), timeout=deadline - loop.time())
        await self.pipeline.wait_answered(deadline - loop.time())
        return max(len(self.in_flight), self.running)

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Answer whatever still runs with an error, send what is queued, close the websocket normally
        (1000), then the document session and the engine."""
        self.accepting = False
        await self.pipeline.close(grace=flush_timeout)
        if not await self.link.flush(timeout=flush_timeout):
            log.warning("source %s: %d frame(s) could not be sent before closing", self.source_name,
                        self.link.pending_frames)
        await self.link.close()
        await self.documents.close()
        if self.engine is not None:
            await self.engine.close()
        if self._environment_engines is not None:
            await self._environment_engines.close()
        for task, old in list(self._retiring.items()):
            task.cancel()
            await old.close()


class _DependenciesOff:
    """The source's documents, each checked for a PEP 723 block as it arrives (scriptDependencies off):
    a script declaring dependencies is a 400 naming the key, not an ImportError in the middle of its run."""

    def __init__(self, documents: DocumentStore):
        self._documents = documents

    async def get(self, name: str, *, force: bool = False) -> Any:
        script = await self._documents.get(name, force=force)
        if SCRIPT_BLOCK in script.text:
            from .envs import gate
            await gate.environment_for(script.text, None)
        return script


def _query_timeout(params: dict[str, Any], default: float) -> float | None:
    """The query's own limit (WITH timeout, else the source's executionTimeout); None: none."""
    given = params.get("timeout")
    if isinstance(given, int | float) and not isinstance(given, bool) and given > 0:
        return float(given)
    return default or None


def _not_configured() -> QueryError:
    return QueryError(errors.SHUTTING_DOWN, "The source is not configured yet; send the query again.")

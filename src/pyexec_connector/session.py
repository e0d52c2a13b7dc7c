"""One source: its link, its configuration, its engine and documents, and the handling of each query."""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from . import errors, protocol
from .config import ServerConfig, SourceConfig, parse_source_config
from .connection import ConnectorConnection, Health
from .documents import DocumentStore
from .engine import Engine, Job, Outcome
from .engine.inline import InlineEngine
from .engine.process import ProcessEngine
from .errors import QueryError
from .link import Backoff, LinkState, SourceLink
from .reply import ReplyChannel, notification_builder
from .request import QueryRequest, parse_query

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class QueryEnded:
    """What one finished query tells its observer (metrics): known only in `answer()`'s finally."""
    source: str
    reply_address: str
    status: int | None          # the terminal status sent: 200, 204 or 400
    message_code: str | None    # the error's messageCode, for a 400
    duration: float             # seconds, from the query frame to the terminal reply

    @property
    def outcome(self) -> str:
        return "ok" if self.status in (200, 204) else "error"


QueryObserver = Callable[[QueryEnded], None]


class SourceSession:
    def __init__(self, source_name: str, config: ServerConfig, *, reconnect_secret: str, health: Health,
                 backoff: Backoff | None = None, handshake_timeout: float | None = None,
                 observer: QueryObserver | None = None):
        self.source_name = source_name
        self.observer = observer
        self.server_config = config
        self.source_config = SourceConfig()
        link_options: dict[str, Any] = {"backoff": backoff}
        if handshake_timeout is not None:
            link_options["handshake_timeout"] = handshake_timeout
        self.link = SourceLink(source_name, config, self, reconnect_secret=f"{source_name}_{reconnect_secret}",
                               on_state=self._state_changed, **link_options)
        self.connection = ConnectorConnection(
            source_name, self.link.send, self.link.drained,
            notification_builder(source_name, config.max_message_bytes), config.public_properties, health)
        self.documents = DocumentStore(config.rest_base, config.auth_token, ssl=config.ssl_context(),
                                       cache_capacity=self.source_config.codeCacheSize,
                                       timeout=config.document_timeout, max_bytes=config.max_document_bytes)
        self.health = health
        self.engine: Engine | None = None          # built by the first configure
        self._retiring: dict[asyncio.Task, Engine] = {}   # engines a reconfigure replaced, finishing up
        self.in_flight: set[asyncio.Task] = set()
        self.unanswered: set[ReplyChannel] = set()
        self.accepting = True
        self.configured = asyncio.Event()
        self.queries_answered = 0

    def _state_changed(self, source: str, state: LinkState) -> None:
        log.debug("source %s: link %s", source, state.value)

    # ---- LinkHandler -----------------------------------------------------------------------
    def on_configure(self, config: Any) -> None:
        previous = self.source_config
        self.source_config = parse_source_config(config, self.source_name)
        self._rebuild_engine(previous)
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
                 else f"in {config.worker_count} worker process(es)")
        if old is not None:
            retire = getattr(old, "retire", None)
            task = asyncio.create_task(retire() if retire is not None else old.close())
            self._retiring[task] = old
            task.add_done_callback(self._retiring.pop)

    def _make_engine(self, config: SourceConfig) -> Engine:
        if config.executionMode == "inline":
            return InlineEngine(self.connection, config)
        return ProcessEngine(config, source_name=self.source_name, send=self.link.send,
                             drained=self.link.drained, is_drained=self.link.is_drained, health=self.health,
                             write_link=self.link.write_now,
                             server_config=self.server_config.public_properties,
                             max_message_bytes=self.server_config.max_message_bytes)

    def on_unreadable_query(self, reply_address: str, error: QueryError) -> None:
        """A query frame that could not be parsed (cut off, too large) but names its reply address."""
        channel = ReplyChannel(self.link.send, reply_address, self.source_name, self.server_config.max_message_bytes)
        channel.error(error)
        self.queries_answered += 1
        self._ended(QueryEnded(self.source_name, reply_address, channel.status, channel.error_code, 0.0))

    def on_query(self, frame: protocol.QueryFrame) -> None:
        # The channel exists before the task runs: a task cancelled before its first step never reaches
        # answer()'s finally, and close() answers its query through the channel instead.
        channel = ReplyChannel(self.link.send, frame.reply_address, self.source_name,
                               self.server_config.max_message_bytes)
        started = perf_counter()
        self.unanswered.add(channel)
        engine = self.engine
        if self.accepting and type(engine) is ProcessEngine:
            try:
                query = engine.relay(frame, channel)
            except Exception:   # noqa: BLE001 - a bug there must not cost the query its reply: answer() runs it
                log.exception("source %s: relaying query %s failed; running it the ordinary way",
                              self.source_name, frame.reply_address)
                query = None
            if query is not None:   # a worker has it; no task: its end calls _relayed()
                self.in_flight.add(query.future)
                query.future.add_done_callback(functools.partial(self._relayed, engine, query, started))
                return
        task = asyncio.create_task(self.answer(frame, channel, started))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    # ---- one query --------------------------------------------------------------------------
    def _relayed(self, engine: ProcessEngine, query: Any, started: float, future: asyncio.Future) -> None:
        """The end of a query ProcessEngine.relay() handed to a worker: answer()'s work, without a task."""
        self.in_flight.discard(future)
        channel = query.channel
        try:
            outcome = engine.settle(query)
            if not outcome.answered and outcome.results_json is not None:   # None: the code replied itself
                channel.complete_raw(self._body(outcome, started))
        except QueryError as exc:
            channel.error(exc)
        except asyncio.CancelledError:
            channel.error(QueryError(errors.SHUTTING_DOWN, "The connector stopped before the query finished."))
        except Exception as exc:   # noqa: BLE001 - answered below, and logged
            self._internal_error(channel, exc)
        finally:
            self._answered(channel, started)

    async def answer(self, frame: protocol.QueryFrame, channel: ReplyChannel, started: float) -> None:
        """Run one query. The `finally` is the one place that guarantees its terminal reply (and close()
        for a task cancelled before it ever ran)."""
        try:
            if not self.accepting:
                raise QueryError(errors.SHUTTING_DOWN, "The connector is shutting down; send the query again "
                                                       "once it is back.")
            request = parse_query(frame.params)
            engine = self.engine
            if engine is None:
                raise QueryError(errors.SHUTTING_DOWN, "The source is not configured yet; send the query "
                                                       "again.")
            job = await self._job(request)
            outcome = await engine.run(job, channel)
            if not outcome.answered and (not request.code_handles_return or request.dry_run):
                channel.complete_raw(self._body(outcome, started))
        except QueryError as exc:
            channel.error(exc)
        except asyncio.CancelledError:
            channel.error(QueryError(errors.SHUTTING_DOWN, "The connector stopped before the query finished."))
            raise
        except Exception as exc:
            self._internal_error(channel, exc)
        finally:
            self._answered(channel, started)

    def _internal_error(self, channel: ReplyChannel, exc: Exception) -> None:
        log.error("source %s: internal error answering query %s", self.source_name, channel.reply_address,
                  exc_info=exc)
        channel.error(QueryError(errors.INTERNAL_ERROR, "The connector failed while answering: {0}",
                                 [f"{type(exc).__name__}: {exc}"]))

    def _answered(self, channel: ReplyChannel, started: float) -> None:
        """Every query's last step, however it ended: a terminal reply for sure, then its log line and
        metrics."""
        if not channel.terminated:
            channel.error(QueryError(errors.INTERNAL_ERROR, "The query ended without a reply."))
        self.unanswered.discard(channel)
        self.queries_answered += 1
        self._ended(QueryEnded(self.source_name, channel.reply_address, channel.status, channel.error_code,
                               perf_counter() - started))

    def _ended(self, ended: QueryEnded) -> None:
        """The one place a query ends: its log line (with structured fields) and its observer."""
        error = ended.status == protocol.STATUS_ERROR
        if log.isEnabledFor(logging.INFO if error else logging.DEBUG):
            log.log(logging.INFO if error else logging.DEBUG,
                    "source %s: query %s answered %s%s in %.3f s", ended.source, ended.reply_address,
                    ended.status, f" ({ended.message_code})" if error else "", ended.duration,
                    extra={"source": ended.source, "replyAddress": ended.reply_address,
                           "duration": round(ended.duration, 6), "outcome": ended.outcome,
                           "status": ended.status, "messageCode": ended.message_code})
        if self.observer is not None:
            try:
                self.observer(ended)
            except Exception:  # noqa: BLE001 - metrics must never cost a reply
                log.exception("source %s: the query observer failed", self.source_name)

    async def _job(self, request: QueryRequest) -> Job:
        if request.script is None:
            return self._code_job(request)
        script = await self.documents.get(request.script, force=request.replace)
        return self._make_job(request, script.text, script.modified)

    def _code_job(self, request: QueryRequest) -> Job:
        return self._make_job(request, request.code, request.code)

    def _make_job(self, request: QueryRequest, text: str | None, fingerprint: Any) -> Job:
        limit = request.timeout if request.timeout is not None else self.source_config.executionTimeout
        config = self.source_config
        return Job(request, text, fingerprint, config.returnRuntimeInformation, limit or None,
                   config.resultValues == "rich")

    @staticmethod
    def _body(outcome: Outcome, started: float) -> str:
        body = '{"pythonCallResults":' + (outcome.results_json or "{}")
        if outcome.runtime is not None:
            outcome.runtime["totalTime"] = perf_counter() - started
            body += ',"connectorRuntimeInfo":' + protocol.dumps(outcome.runtime)
        if outcome.output is not None:
            body += ',"pythonOutput":' + protocol.dumps(outcome.output)
        if outcome.dry_run is not None:
            body += ',"dryRun":' + protocol.dumps(outcome.dry_run)
        return body + "}"

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
        return len(self.in_flight)

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Answer whatever still runs with an error, send what is queued, close the websocket normally
        (1000), then the document session and the engine."""
        self.accepting = False
        for task in list(self.in_flight):
            task.cancel()
        if self.in_flight:
            await asyncio.gather(*self.in_flight, return_exceptions=True)
        for channel in list(self.unanswered):     # tasks cancelled before their first step
            channel.error(QueryError(errors.SHUTTING_DOWN, "The connector stopped before the query started."))
        self.unanswered.clear()
        if not await self.link.flush(timeout=flush_timeout):
            log.warning("source %s: %d frame(s) could not be sent before closing", self.source_name,
                        self.link.pending_frames)
        await self.link.close()
        await self.documents.close()
        if self.engine is not None:
            await self.engine.close()
        for task, old in list(self._retiring.items()):
            task.cancel()
            await old.close()

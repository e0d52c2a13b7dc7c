"""One source: its link, its configuration, its engine and documents, and the handling of each query."""
from __future__ import annotations

import asyncio
import functools
import logging
from time import perf_counter
from typing import Any

from . import errors, protocol
from .config import ServerConfig, SourceConfig, parse_source_config
from .connection import ConnectorConnection, Health
from .documents import DocumentStore
from .engine import Engine, Job
from .engine.inline import InlineEngine
from .errors import QueryError
from .link import Backoff, LinkState, SourceLink
from .reply import ReplyChannel
from .request import QueryRequest, parse_query

log = logging.getLogger(__name__)


class SourceSession:
    def __init__(self, source_name: str, config: ServerConfig, *, reconnect_secret: str, health: Health,
                 backoff: Backoff | None = None, handshake_timeout: float | None = None):
        self.source_name = source_name
        self.server_config = config
        self.source_config = SourceConfig()
        link_options: dict[str, Any] = {"backoff": backoff}
        if handshake_timeout is not None:
            link_options["handshake_timeout"] = handshake_timeout
        self.link = SourceLink(source_name, config, self, reconnect_secret=f"{source_name}_{reconnect_secret}",
                               on_state=self._state_changed, **link_options)
        self.connection = ConnectorConnection(
            source_name, self.link.send, self.link.drained,
            functools.partial(protocol.notification_frame, source_name), config.public_properties, health)
        self.documents = DocumentStore(config.rest_base, config.auth_token, ssl=config.ssl_context(),
                                       cache_capacity=self.source_config.codeCacheSize)
        self.engine: Engine = InlineEngine(self.connection, self.source_config.codeCacheSize)
        self.in_flight: set[asyncio.Task] = set()
        self.accepting = True
        self.configured = asyncio.Event()
        self.queries_answered = 0

    def _state_changed(self, source: str, state: LinkState) -> None:
        log.debug("source %s: link %s", source, state.value)

    # ---- LinkHandler -----------------------------------------------------------------------
    def on_configure(self, config: Any) -> None:
        self.source_config = parse_source_config(config, self.source_name)
        self.engine.reconfigure(self.source_config.codeCacheSize)
        self.documents.reconfigure(self.source_config.codeCacheSize)
        self.configured.set()

    def on_query(self, frame: protocol.QueryFrame) -> None:
        task = asyncio.create_task(self.answer(frame))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    # ---- one query --------------------------------------------------------------------------
    async def answer(self, frame: protocol.QueryFrame) -> None:
        """Run one query. The `finally` is the one place that guarantees its terminal reply."""
        channel = ReplyChannel(self.link.send, frame.reply_address, self.source_name)
        started = perf_counter()
        try:
            if not self.accepting:
                raise QueryError(errors.SHUTTING_DOWN, "The connector is shutting down; send the query again "
                                                       "once it is back.")
            request = parse_query(frame.params)
            job = await self._job(request)
            outcome = await self.engine.run(job, channel)
            if not request.code_handles_return:
                channel.complete_raw(self._body(outcome.results_json or "{}", outcome.runtime, started))
        except QueryError as exc:
            channel.error(exc)
        except asyncio.CancelledError:
            channel.error(QueryError(errors.SHUTTING_DOWN, "The connector stopped before the query finished."))
            raise
        except Exception as exc:
            log.exception("source %s: internal error answering query %s", self.source_name, frame.reply_address)
            channel.error(QueryError(errors.INTERNAL_ERROR, "The connector failed while answering: {0}",
                                     [f"{type(exc).__name__}: {exc}"]))
        finally:
            if not channel.terminated:
                channel.error(QueryError(errors.INTERNAL_ERROR, "The query ended without a reply."))
            self.queries_answered += 1

    async def _job(self, request: QueryRequest) -> Job:
        if request.script is not None:
            script = await self.documents.get(request.script, force=request.replace)
            text, fingerprint = script.text, script.modified
        else:
            text, fingerprint = request.code, request.code
        return Job(request, text, fingerprint, self.source_config.returnRuntimeInformation)

    @staticmethod
    def _body(results_json: str, runtime: dict[str, Any] | None, started: float) -> str:
        if runtime is None:
            return '{"pythonCallResults":' + results_json + "}"
        runtime["totalTime"] = perf_counter() - started
        return '{"pythonCallResults":' + results_json + ',"connectorRuntimeInfo":' + protocol.dumps(runtime) + "}"

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        await self.link.run()

    async def close(self) -> None:
        self.accepting = False
        for task in list(self.in_flight):
            task.cancel()
        if self.in_flight:
            await asyncio.gather(*self.in_flight, return_exceptions=True)
        await self.link.flush(timeout=2.0)
        await self.link.close()
        await self.documents.close()
        await self.engine.close()

"""What every query goes through whichever engine runs it: from its frame to its Job, and its one end.

    SourceSession.on_query ──► Engine.submit(frame, channel)
                                  ├─ the engine hands the frame on as it came (process mode, plain query)
                                  └─ Pipeline.prepare: parse the WITH clause, make the Job (documents);
                                     the engine runs it, Pipeline.complete awaits the run
                               ──► Pipeline.finish(channel, outcome | error)   the one completion

`finish` builds the reply body, ends the query through its ReplyChannel (once only), and writes the end
into the source's QueryLog (querylog.py: count, log line, metrics), a sink the session hands the pipeline:
nothing calls back up into the session. A query ends once: a second `finish` for it (its code let go
after its timeout was answered) does nothing."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .. import errors, forkguard, protocol
from ..config import SourceConfig
from ..errors import QueryError
from ..reply import ReplyChannel
from ..request import QueryRequest, parse_query
from .base import Job, Outcome, reply_body

if TYPE_CHECKING:
    from ..querylog import QueryLog

log = logging.getLogger(__name__)
_MAX_WARNED = 1024     # lenient combinations remembered (each logged once); past it, none more


class Pipeline:
    """One source's query pipeline: the parts of a query's handling no engine owns."""

    def __init__(self, source_name: str, documents: Any, ended: QueryLog):
        self.source_name = source_name
        self.config = SourceConfig()
        self._documents = documents
        self._ended = ended
        self.in_flight: set[asyncio.Future] = set()    # queries running: close() cancels them
        self.unanswered: set[ReplyChannel] = set()     # queries taken and not ended yet
        self._warned: set[tuple[str, str, str | None]] = set()   # lenient combinations logged once each
        self._all_answered: asyncio.Event | None = None     # set when `unanswered` empties (wait_answered)

    def begin(self, channel: ReplyChannel) -> None:
        channel.started = perf_counter()
        self.unanswered.add(channel)

    def track(self, running: asyncio.Future) -> None:
        self.in_flight.add(running)
        running.add_done_callback(self.in_flight.discard)

    # ---- the connector parses the query -------------------------------------------------------
    async def prepare(self, frame: protocol.QueryFrame, channel: ReplyChannel) -> Job | None:
        """The query's Job (its WITH clause parsed, its document fetched), or None when it was answered
        already (a bad WITH clause, a missing document...)."""
        try:
            return await self.job(self.request(frame))
        except (Exception, asyncio.CancelledError) as exc:   # noqa: BLE001 - each is answered
            self.fail(channel, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return None

    def request(self, frame: protocol.QueryFrame) -> QueryRequest:
        """The query's WITH clause, parsed under the source's strictParameters. Raises QueryError."""
        return parse_query(frame.params, strict=self.config.strictParameters, warn=self._lenient)

    async def complete(self, channel: ReplyChannel, running: Awaitable[Outcome]) -> None:
        """Await the run's outcome and finish with it. Every outcome ends in `finish`."""
        try:
            outcome = await running
        except (Exception, asyncio.CancelledError) as exc:   # noqa: BLE001 - each is answered
            self.fail(channel, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            self.finish(channel, outcome)

    def _lenient(self, code: str, script: str, name: str | None) -> None:
        """A combination upstream accepts and strictParameters would refuse: said once per source and
        (script, name), so a busy query does not flood the log; the set stops growing at a bound."""
        key = (code, script, name)
        if key in self._warned or len(self._warned) >= _MAX_WARNED:
            return
        self._warned.add(key)
        if code == errors.AMBIGUOUS_CODE:
            log.warning("source %s: a query gives both code and script %r: the code runs and the script is "
                        "ignored, as upstream does (set strictParameters: true to refuse it)",
                        self.source_name, script)
        else:
            log.warning("source %s: a query gives script %r with the name %r: the document runs under the "
                        "script's name, as upstream does (set strictParameters: true to refuse it)",
                        self.source_name, script, name)

    async def job(self, request: QueryRequest) -> Job:
        if request.script is None:
            return self.make_job(request, request.code, request.code)
        script = await self._documents.get(request.script, force=request.replace)
        return self.make_job(request, script.text, script.modified)

    def make_job(self, request: QueryRequest, text: str | None, fingerprint: Any) -> Job:
        """The Job of `request` run from `text` (None: cached code only), cached under `fingerprint`: for a
        query without a script document it needs nothing awaited (code and fingerprint: its code)."""
        config = self.config
        return Job(request, text, fingerprint, config.returnRuntimeInformation,
                   time_limit(request.timeout, config), config.resultValues == "rich")

    # ---- the end --------------------------------------------------------------------------------
    def fail(self, channel: ReplyChannel, exc: BaseException) -> None:
        """Finish with the error `exc` stands for: a QueryError as it is, a cancellation as "stopped",
        anything else as an internal error (logged)."""
        if isinstance(exc, QueryError):
            self.finish(channel, error=exc)
        elif isinstance(exc, asyncio.CancelledError):
            self.finish(channel, error=stopped())
        elif isinstance(exc, Exception):
            self.finish(channel, error=self._internal_error(channel, exc))
        else:
            raise exc

    def finish(self, channel: ReplyChannel, outcome: Outcome | None = None,
               error: QueryError | None = None) -> None:
        """The one end of every query: its terminal reply (the error, or the body built from the
        outcome unless a worker or the code sent it), then its log line and metrics."""
        forkguard.check()
        if channel not in self.unanswered:
            return      # ended already: its timeout was answered at the deadline, or the source closed
        try:
            if error is not None:
                channel.error(error)
            elif outcome is not None and not outcome.answered and outcome.results_json is not None:
                channel.complete_raw(reply_body(outcome, channel.started))
        except Exception as exc:   # noqa: BLE001 - a bug here must not cost the reply
            channel.error(self._internal_error(channel, exc))
        finally:
            if not channel.terminated:
                channel.error(QueryError(errors.INTERNAL_ERROR, "The query ended without a reply."))
            unanswered = self.unanswered
            unanswered.discard(channel)
            self._ended.ended(channel)
            if not unanswered and self._all_answered is not None:
                self._all_answered.set()

    def _internal_error(self, channel: ReplyChannel, exc: Exception) -> QueryError:
        log.error("source %s: internal error answering query %s", self.source_name, channel.reply_address,
                  exc_info=exc)
        return QueryError(errors.INTERNAL_ERROR, "The connector failed while answering: {0}",
                          [f"{type(exc).__name__}: {exc}"])

    async def wait_answered(self, timeout: float) -> None:
        """Until every query taken has its terminal reply, for `timeout` seconds at most (a relayed query
        has no task to wait for: its end is Pipeline.finish's)."""
        if not self.unanswered or timeout <= 0:
            return
        event = self._all_answered = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass
        finally:
            self._all_answered = None

    async def close(self, grace: float) -> None:
        """Stop what still runs (each is answered "shutting down") and answer the queries that never
        started. Code that ignores cancellation is given `grace` seconds, not more."""
        for running in list(self.in_flight):
            running.cancel()
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=grace)
        for channel in list(self.unanswered):
            self.finish(channel, error=QueryError(errors.SHUTTING_DOWN,
                                                  "The connector stopped before the query finished."))


def time_limit(requested: float | None, config: SourceConfig) -> float | None:
    """The one rule for a query's timeout: its WITH timeout, else the source's executionTimeout; 0 or
    none: no limit (None)."""
    limit = requested if requested is not None else config.executionTimeout
    return limit or None


def stopped() -> QueryError:
    return QueryError(errors.SHUTTING_DOWN, "The connector stopped before the query finished.")


def not_accepting() -> QueryError:
    return QueryError(errors.SHUTTING_DOWN, "The connector is shutting down; send the query again once it is "
                                            "back.")


def timeout_error(seconds: float | None) -> QueryError:
    return QueryError(errors.TIMEOUT, "The code did not finish within its timeout of {0} seconds "
                                      "(WITH timeout, or the source's executionTimeout).", [seconds])


class Deadlines:
    """Timeouts of running queries, checked by one sweep every `interval` while any is running, not a
    timer per query (a timer handle made and cancelled per query cost ~2 us of the connector's CPU).
    An item has a `deadline` attribute (loop time; 0.0: none or passed); `pending()` yields the items
    still running; `expire(item)` is called once for each whose deadline passed."""

    def __init__(self, expire: Callable[[Any], None], pending: Callable[[], Iterable[Any]],
                 interval: float = 0.05):
        self._expire = expire
        self._pending = pending
        self._interval = interval
        self._sweeping: asyncio.TimerHandle | None = None

    def watch(self, item: Any, seconds: float, loop: asyncio.AbstractEventLoop) -> None:
        item.deadline = loop.time() + seconds
        if self._sweeping is None:
            self._sweeping = loop.call_later(self._interval, self._sweep, loop)

    @property
    def sweeping(self) -> bool:
        """Whether a sweep is scheduled (none while no query with a timeout runs)."""
        return self._sweeping is not None

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeping = None
        now, waiting, expired = loop.time(), False, []
        for item in self._pending():
            deadline = item.deadline
            if deadline:
                if deadline <= now:
                    item.deadline = 0.0
                    expired.append(item)
                else:
                    waiting = True
        for item in expired:
            try:
                self._expire(item)
            except Exception:   # noqa: BLE001 - one query's end must not stop the sweep
                log.exception("answering a timed-out query failed")
        if waiting:
            self._sweeping = loop.call_later(self._interval, self._sweep, loop)

    def close(self) -> None:
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None

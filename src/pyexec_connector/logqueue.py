"""Logging that never blocks the event loop, and warnings that cannot flood the log.

`install()` moves every handler configured so far (the default stdout handler, or whatever
serverConfig/logger.ini set up) behind one `LogPump`: the loop only puts records on an in-memory queue,
and a thread writes them. When the output stalls (stdout is a pipe nobody reads), the queue fills up to
its byte budget and further records are dropped and counted; one line reports the count once the output
takes lines again. A stalled log costs log lines, never queries.

`rate_limit(logger)` attaches a `RateLimitFilter`: records logged with `extra={"rate_key": ...}` pass for
the first few of their kind in each window of time; the rest are counted and summed up in one line.

The stdlib's QueueHandler is the producer side. Its QueueListener is not used: it has one handler list
for the whole queue (logger.ini may give several loggers their own) and its stop() waits without bound
for a thread that may be stuck writing to a stalled pipe."""
from __future__ import annotations

import atexit
import copy
import logging
import logging.handlers
import queue
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

DEFAULT_QUEUE_BYTES = 8 * 1024 * 1024
RECORD_OVERHEAD = 600          # a LogRecord's own memory, about, beside its message
IDLE_SECONDS = 1.0             # how often the pump looks for due summaries while nothing is logged
STOP_TIMEOUT = 5.0
RATE_FIRST = 10                # records of one kind logged in full per window...
RATE_WINDOW = 30.0             # ...of this many seconds; the rest are counted in one summary line
MAX_KINDS = 256                # distinct rate_keys remembered; more are let through unlimited

_FORMATTER = logging.Formatter()
_STOP = object()
_pump: LogPump | None = None
_atexit_registered = False
_limiters: weakref.WeakSet[RateLimitFilter] = weakref.WeakSet()


class LogPump:
    """A byte-bounded queue of records and the thread that hands them to the real handlers."""

    def __init__(self, max_bytes: int = DEFAULT_QUEUE_BYTES, report_to: Iterable[logging.Handler] = ()):
        self.max_bytes = max_bytes
        self.report_to = tuple(report_to)      # where the "lines dropped" line goes (the root's handlers)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()   # never blocks; the bound is kept in put()
        self._lock = threading.Lock()
        self._bytes = 0
        self._dropped = 0                      # since the last report
        self.dropped_total = 0
        self._thread = threading.Thread(target=self._run, name="log-pump", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, targets: tuple[logging.Handler, ...], record: logging.LogRecord) -> None:
        """Queue a prepared record for `targets`; drop it (counted) when the queue is at its budget."""
        size = RECORD_OVERHEAD + len(record.msg) + len(record.exc_text or "") + len(record.stack_info or "")
        with self._lock:
            if self._bytes + size > self.max_bytes:
                self._dropped += 1
                self.dropped_total += 1
                return
            self._bytes += size
        self._queue.put((targets, record, size))

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Write what is queued (and due rate-limit summaries), then end the thread. False when the
        output did not take it all within `timeout` (the thread, a daemon, is then left behind)."""
        if not self._thread.is_alive():
            return True
        flush_summaries(force=True)
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        for handler in _handlers_of(self.report_to):
            try:
                handler.flush()
            except Exception:  # noqa: BLE001, S110 - a broken output must not break shutdown
                pass
        return True

    def _run(self) -> None:
        # Signals go to the main thread: one landing here would interrupt a write blocked on a full pipe,
        # and CPython may then write part of the buffer twice.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        while True:
            try:
                item = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                flush_summaries()
                self._report_drops()
                continue
            if item is _STOP:
                self._report_drops()
                return
            targets, record, size = item
            _emit(targets, record)
            with self._lock:
                self._bytes -= size
            if self._queue.empty():
                self._report_drops()

    def _report_drops(self) -> None:
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            record = logging.LogRecord(
                "pyexec_connector.logging", logging.WARNING, __file__, 0,
                "%d log line(s) dropped: the log output did not keep up (is stdout a pipe nobody reads?)",
                (dropped,), None)
            _emit(self.report_to, record)


class QueueingHandler(logging.handlers.QueueHandler):
    """Stands in for a logger's handlers: puts the record on the pump's queue, never waits."""

    def __init__(self, pump: LogPump, targets: tuple[logging.Handler, ...]):
        super().__init__(pump._queue)    # unused: enqueue() goes through the pump's byte budget
        self.pump = pump
        self.targets = targets
        self.setLevel(min((h.level for h in targets), default=logging.NOTSET))

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The message and the traceback are rendered now, on the caller's thread: the arguments may be
        # changed by the loop before the pump writes them, and a traceback keeps whole frames alive. Unlike
        # the stdlib's prepare(), the traceback stays apart (exc_text), so JSON lines keep "exception".
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = _FORMATTER.formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        self.pump.put(self.targets, record)

    def flush(self) -> None:
        pass


def _emit(targets: Iterable[logging.Handler], record: logging.LogRecord) -> None:
    for handler in targets:
        if record.levelno >= handler.level:
            handler.handle(record)     # the handler's own filters, lock and error handling


def _handlers_of(targets: Iterable[logging.Handler]) -> list[logging.Handler]:
    return [h for h in targets if not isinstance(h, QueueingHandler)]


def _loggers_with_handlers() -> list[logging.Logger]:
    loggers = [logging.getLogger()]
    loggers += [lg for lg in list(logging.Logger.manager.loggerDict.values())
                if isinstance(lg, logging.Logger) and lg.handlers]
    return loggers


def install(max_bytes: int = DEFAULT_QUEUE_BYTES) -> LogPump:
    """Put every logger's handlers behind one pump (replacing a pump installed before) and start it."""
    stop()
    root_targets: tuple[logging.Handler, ...] = ()
    moves: list[tuple[logging.Logger, tuple[logging.Handler, ...]]] = []
    for logger in _loggers_with_handlers():
        targets = tuple(h for h in logger.handlers if not isinstance(h, QueueingHandler))
        if logger is logging.getLogger():
            root_targets = targets
        if targets:
            moves.append((logger, targets))
    pump = LogPump(max_bytes, report_to=root_targets)
    for logger, targets in moves:
        logger.handlers[:] = [QueueingHandler(pump, targets)]
    pump.start()
    global _pump, _atexit_registered
    _pump = pump
    if not _atexit_registered:     # runs before logging's own atexit flush (registered earlier)
        atexit.register(stop)
        _atexit_registered = True
    return pump


def current() -> LogPump | None:
    return _pump


def stop(timeout: float = STOP_TIMEOUT) -> bool:
    """Write what is queued and stop the pump; the handlers go back to their loggers. True when all was
    written within `timeout`. Safe to call when no pump runs."""
    global _pump
    pump, _pump = _pump, None
    if pump is None:
        return True
    done = pump.stop(timeout)
    if done:
        for logger in _loggers_with_handlers():
            restored: list[logging.Handler] = []
            for handler in logger.handlers:
                restored.extend(handler.targets if isinstance(handler, QueueingHandler) else (handler,))
            logger.handlers[:] = restored
    return done


# ---- rate limiting -------------------------------------------------------------------------------
@dataclass(slots=True)
class _Kind:
    window_start: float
    passed: int = 0
    held: int = 0
    logger: str = ""
    level: int = logging.WARNING
    last: str = ""          # the last message held back, quoted in the summary


class RateLimitFilter(logging.Filter):
    """A logger filter for repeated records of one kind (a record's `rate_key`, given with `extra=`):
    in each window of `window` seconds the first `first` pass; the others are counted, and one summary
    line with the count and the last of them is logged when the window ends (found by the next record of
    that kind, by the log pump's idle check, or at shutdown). Records without a rate_key pass untouched."""

    def __init__(self, first: int = RATE_FIRST, window: float = RATE_WINDOW,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        if first < 0 or window <= 0:
            raise ValueError("first must be >= 0 and window > 0")
        self.first, self.window, self._clock = first, window, clock
        self._kinds: dict[str, _Kind] = {}
        self._lock = threading.Lock()
        self.held_total = 0
        _limiters.add(self)

    def filter(self, record: logging.LogRecord) -> bool:
        key = getattr(record, "rate_key", None)
        if key is None:
            return True
        now = self._clock()
        summary = None
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None:
                if len(self._kinds) >= MAX_KINDS:
                    self._forget_quiet(now)
                    if len(self._kinds) >= MAX_KINDS:
                        return True
                kind = self._kinds[key] = _Kind(now)
            elif now - kind.window_start >= self.window:
                summary = self._close_window(kind, now)
            if kind.passed < self.first:
                kind.passed += 1
                passed = True
            else:
                kind.held += 1
                self.held_total += 1
                kind.logger, kind.level = record.name, record.levelno
                try:
                    kind.last = record.getMessage()
                except Exception:  # noqa: BLE001 - a broken record is logging's problem, not ours
                    kind.last = str(record.msg)
                passed = False
        if summary is not None:
            _log_summary(*summary)
        return passed

    def flush(self, force: bool = False) -> None:
        """Log the summary of every window that ended (all of them with `force`)."""
        now = self._clock()
        summaries = []
        with self._lock:
            for kind in self._kinds.values():
                if kind.held and (force or now - kind.window_start >= self.window):
                    summary = self._close_window(kind, now)
                    if summary is not None:
                        summaries.append(summary)
        for summary in summaries:
            _log_summary(*summary)

    def reset(self) -> None:
        """Forget every kind (what was held back is not summed up)."""
        with self._lock:
            self._kinds.clear()

    def _forget_quiet(self, now: float) -> None:
        for key in [k for k, kind in self._kinds.items() if not kind.held and now - kind.window_start >= self.window]:
            del self._kinds[key]

    def _close_window(self, kind: _Kind, now: float) -> tuple[str, int, str, int, float] | None:
        summary = (kind.logger, kind.level, kind.last, kind.held, now - kind.window_start) if kind.held else None
        kind.window_start, kind.passed, kind.held = now, 0, 0
        return summary


def _log_summary(logger: str, level: int, last: str, held: int, seconds: float) -> None:
    logging.getLogger(logger).log(level, "%d more like this were not logged in the last %.1f s; the last: %s",
                                  held, seconds, last)


def reset_rate_limits() -> None:
    """Every RateLimitFilter starts afresh (for tests: each one starts with the full budget)."""
    for limiter in list(_limiters):
        limiter.reset()


def flush_summaries(force: bool = False) -> None:
    for limiter in list(_limiters):
        limiter.flush(force)


def rate_limit(logger: logging.Logger, first: int = RATE_FIRST, window: float = RATE_WINDOW) -> RateLimitFilter:
    """Attach a RateLimitFilter to `logger` (records it logs with `extra={"rate_key": ...}` are limited)."""
    limiter = RateLimitFilter(first, window)
    logger.addFilter(limiter)
    return limiter

"""What every ended query leaves behind, kept as plain numbers: QueryLog (one per source; Pipeline.finish
writes each end into it) and the QueryFigures /metrics exports. Below the engines and the pipeline that
write into it, and below health.py and exposition.py that read it: it imports neither."""
from __future__ import annotations

import logging
from bisect import bisect_left
from time import perf_counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .reply import ReplyChannel

log = logging.getLogger(__name__)
# each query's line comes from the session's logger, as it always did: operators' logging configurations name it
query_log = logging.getLogger("pyexec_connector.session")

MAX_MESSAGE_CODES = 100     # distinct message_code label values per source; the rest count as OTHER_CODE
OTHER_CODE = "other"
_OK_STATUSES = frozenset({200, 204})
_STATUS_ERROR = 400

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class QueryFigures:
    """One source's query counts, kept as plain numbers: QueryLog.ended() is on every query, and
    prometheus' own Counter and Histogram take a lock and look their labels up on each call."""

    __slots__ = ("ok", "error", "buckets", "total_seconds", "errors")

    def __init__(self) -> None:
        self.ok = 0
        self.error = 0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)    # per bucket (the last: +Inf), not cumulative
        self.total_seconds = 0.0
        self.errors: dict[str, int] = {}


class QueryLog:
    """What every ended query of one source leaves behind: the count (`answered`), its log line (DEBUG; an
    error reply at INFO) and its metric figures, updated in place. A sink below the pipeline
    (Pipeline.finish writes each end into it), not a callback up into the session."""

    __slots__ = ("source_name", "figures", "answered")

    def __init__(self, source_name: str, figures: QueryFigures | None = None):
        self.source_name = source_name
        self.figures = figures if figures is not None else QueryFigures()
        self.answered = 0

    def ended(self, channel: ReplyChannel) -> None:
        """The query of `channel` sent its terminal reply."""
        duration = perf_counter() - channel.started
        self.answered += 1
        figures = self.figures
        figures.buckets[bisect_left(DURATION_BUCKETS, duration)] += 1
        figures.total_seconds += duration
        status = channel.status
        ok = status in _OK_STATUSES
        if ok:
            figures.ok += 1
        else:
            figures.error += 1
        code = channel.error_code
        if code is not None:
            self._count_error(code)
        level = logging.INFO if status == _STATUS_ERROR else logging.DEBUG
        if query_log.isEnabledFor(level):
            source, address = self.source_name, channel.reply_address
            query_log.log(level, "source %s: query %s answered %s%s in %.3f s", source, address, status,
                          f" ({code})" if level == logging.INFO else "", duration,
                          extra={"source": source, "replyAddress": address, "duration": round(duration, 6),
                                 "outcome": "ok" if ok else "error", "status": status, "messageCode": code})

    def _count_error(self, code: str) -> None:
        errors = self.figures.errors
        if code not in errors and len(errors) >= MAX_MESSAGE_CODES:
            # user code picks its own messageCodes (QueryError): the label's values must stay bounded
            if OTHER_CODE not in errors:
                log.warning("source %s: more than %d distinct error messageCodes; further ones are counted as "
                            "%r in pyexec_query_errors_total", self.source_name, MAX_MESSAGE_CODES, OTHER_CODE)
            code = OTHER_CODE
        errors[code] = errors.get(code, 0) + 1

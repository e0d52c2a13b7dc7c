"""The one small interface between query handling and code execution."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:   # at run time too heavy for worker processes, which only unpickle Jobs
    from ..config import SourceConfig
    from ..protocol import QueryFrame
    from ..reply import ReplyChannel
    from ..request import QueryRequest
    from .stats import EngineStats


@dataclass(slots=True)
class Job:
    """Everything an engine needs to run one query. Never changed once made (not frozen: one is made per
    query, see protocol.QueryFrame)."""
    request: QueryRequest
    source_text: str | None      # None: the query named cached code only
    fingerprint: Any             # what a cached entry must match: the code text, or the document's time
    runtime_info: bool           # the source asked for connectorRuntimeInformation
    timeout: float | None = None  # seconds the run may take (None: no limit)
    rich_results: bool = False   # the source's resultValues is "rich": every global through the rich encoder

    def __reduce__(self):   # sent to a worker per query: see QueryRequest.__reduce__
        return (Job, _job_fields(self))


_job_fields = operator.attrgetter(*Job.__slots__)


@dataclass(slots=True)
class Outcome:
    """What a finished run produced. `results_json` is the pythonCallResults object as JSON text
    (None when the code handled its own replies)."""
    results_json: str | None = None
    runtime: dict[str, Any] | None = None
    output: dict[str, str] | None = None      # captureOutput: {"stdout": ..., "stderr": ...}
    dry_run: dict[str, Any] | None = None     # dryRun: what was checked
    answered: bool = False                    # its 200 reply was already sent (a worker built it)


class Engine(Protocol):
    """Where a source's queries run (inline.py, process.py). The session sees nothing else of it."""

    def submit(self, frame: QueryFrame, channel: ReplyChannel) -> None:
        """Take one query (the Pipeline's `begin` was called for `channel`). The engine decides how to run
        it and ends it through Pipeline.finish, whatever happens; it never raises."""
        ...

    def reconfigure(self, config: SourceConfig) -> None:
        """A fresh source configuration of the same pool shape: rebuild what depends on it."""
        ...

    def stats(self) -> EngineStats:
        """The engine's figures now, for /metrics, /healthz and tests. Cheap; never raises."""
        ...

    async def close(self) -> None:
        """Stop. Every query still running gets its terminal reply (an error) before this returns."""
        ...

    async def retire(self) -> None:
        """After a reconfigure replaced this engine: finish the queries it has, then close."""
        ...


def reply_body(outcome: Outcome, started: float) -> str:
    """The body of a query's 200 reply, built in this one place (the connector's Pipeline.finish, and a
    worker that builds the whole reply itself for speed: see docs/PERFORMANCE.md)."""
    text = '{"pythonCallResults":' + (outcome.results_json or "{}")
    if outcome.runtime is None and outcome.output is None and outcome.dry_run is None:
        return text + "}"
    from time import perf_counter  # here: base.py stays light for what imports only Job

    from ..protocol import dumps

    if outcome.runtime is not None:
        # query_time: upstream's name for the same figure; VAIL written against it keeps working
        outcome.runtime["totalTime"] = outcome.runtime["query_time"] = perf_counter() - started
        text += ',"connectorRuntimeInfo":' + dumps(outcome.runtime)
    if outcome.output is not None:
        text += ',"pythonOutput":' + dumps(outcome.output)
    if outcome.dry_run is not None:
        text += ',"dryRun":' + dumps(outcome.dry_run)
    return text + "}"

"""The one small interface between query handling and code execution."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..reply import ReplyChannel
from ..request import QueryRequest


@dataclass(frozen=True, slots=True)
class Job:
    """Everything an engine needs to run one query."""
    request: QueryRequest
    source_text: str | None      # None: the query named cached code only
    fingerprint: Any             # what a cached entry must match: the code text, or the document's time
    runtime_info: bool           # the source asked for connectorRuntimeInformation


@dataclass(slots=True)
class Outcome:
    """What a finished run produced. `results_json` is the pythonCallResults object as JSON text
    (None when the code handled its own replies)."""
    results_json: str | None = None
    runtime: dict[str, Any] | None = None


class Engine(Protocol):
    async def run(self, job: Job, channel: ReplyChannel) -> Outcome:
        """Run the job. Raises QueryError for anything the caller should be told about. For
        codeHandlesReturn jobs, returns once the code's terminal reply went out through `channel`."""
        ...

    def reconfigure(self, cache_capacity: int) -> None:
        """A fresh source configuration: rebuild what depends on it."""
        ...

    async def close(self) -> None:
        ...

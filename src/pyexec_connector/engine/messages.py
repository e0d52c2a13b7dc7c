"""The messages between the connector and a worker process: one small type per kind.

`wire.py` is their codec. The connector decodes what a worker sends as untrusted input: only these types,
plain data inside them, and QueryError may cross (see wire._DataUnpickler)."""
from __future__ import annotations

from typing import Any, NamedTuple

from ..errors import QueryError

CacheCounts = tuple[int, int]     # a worker's code cache's hits and misses, over its life


# ---- connector -> worker -------------------------------------------------------------------------

class Init(NamedTuple):
    """The first message: the source's settings (see WorkerPool._settings)."""
    settings: dict[str, Any]


class Configure(NamedTuple):
    cache_capacity: int
    forbid: tuple[str, ...]
    runtime_info: bool
    rich_results: bool = False
    queries_per_worker: int | None = None     # the cap on the runs it holds at once (None: unchanged)


class Run(NamedTuple):
    """A query the connector parsed: its Job (see base.Job). `take_by`: see Relay."""
    qid: int
    job: Any
    reply_address: str
    take_by: float = float("inf")


class Relay(NamedTuple):
    """A query frame as it came; the worker reads its WITH clause. `text`: the code cached under the
    query's name, for a query that gave only the name. `take_by`: the time.monotonic() (one clock for
    every process of the machine) after which the worker must not start it: a run it reads later is
    Declined, as the connector has taken it back by then (see pool.WorkerHandle.overdue)."""
    qid: int
    reply_address: str
    text: str | None
    raw: bytes
    take_by: float = float("inf")


class Cancel(NamedTuple):
    qid: int


class Stop(NamedTuple):
    pass


class Accepted(NamedTuple):
    """The connector took `size` more characters of the frames this worker sent for the link (Reply,
    LinkFrame) into the link's outbox, which had room: the worker's awaited sends wait for this once it is
    ACCEPT_WINDOW behind (issue 12). Sent for every ACCEPT_EVERY characters taken, not per frame: a worker
    streaming small replies then costs no extra write either way."""
    size: int


# Characters of link frames a worker may have sent that the connector has not acknowledged: past it, the
# code's awaited sends wait (README "Flow control"). ACCEPT_EVERY must not exceed it: a worker waiting
# with more than ACCEPT_WINDOW unacknowledged always gets an Accepted once the connector took them.
ACCEPT_WINDOW = 1 << 20
ACCEPT_EVERY = ACCEPT_WINDOW // 2


class Ping(NamedTuple):
    """Asks for nothing: the worker's acknowledgement (any message) shows its loop reads (engine/liveness.py)."""


class HealthChanged(NamedTuple):
    """Both ways: the connector tells workers the declared health; a worker's code declares it."""
    healthy: bool


# ---- worker -> connector -------------------------------------------------------------------------

class Ready(NamedTuple):
    pid: int


class Ack(NamedTuple):
    """The answer to a Ping when the worker has nothing else to say (engine/liveness.py)."""


class Reply(NamedTuple):
    """A reply the code sent through connector_connection (checked in the worker)."""
    qid: int
    frame: str
    terminal: bool
    status: int
    error_code: str | None


class LinkFrame(NamedTuple):
    """A frame for the link that belongs to no query (a notification)."""
    frame: str


class Answered(NamedTuple):
    """The run ended and the worker built its whole 200 reply."""
    qid: int
    frame: str
    cache_counts: CacheCounts


class Done(NamedTuple):
    """The run ended; the connector builds the reply (runtime information, output, dry run)."""
    qid: int
    results_json: str | None
    runtime: dict[str, Any] | None
    output: dict[str, str] | None
    dry_run: dict[str, Any] | None
    cache_counts: CacheCounts


class Failed(NamedTuple):
    """The run ended with an error. `refused`: a relayed query's WITH clause was wrong; nothing ran."""
    qid: int
    error: QueryError
    cache_counts: CacheCounts
    refused: bool = False


class Credit(NamedTuple):
    """How many runs the worker has asked for over its life (`granted`), and how many it has read
    (`received`): the connector sends a worker at most `granted` runs in all. A worker asks when its loop
    has nothing ready to run, so a worker held by synchronous code asks for nothing (docs/ENGINE.md)."""
    granted: int
    received: int


class Declined(NamedTuple):
    """A run read after its `take_by`: not started (the connector took it back, or takes it back now)."""
    qid: int


class Cancelled(NamedTuple):
    """The run the connector told to stop has stopped."""
    qid: int


class ProcessesEnded(NamedTuple):
    """When the query ended, `processes` processes it started were still running: they were sent SIGTERM
    (engine/reaper.py). For the log and /metrics."""
    qid: int
    reply_address: str
    processes: int


ACKED = Ack()
TO_WORKER = (Init, Configure, Run, Relay, Cancel, Stop, HealthChanged, Accepted, Ping)
FROM_WORKER = (Ready, Ack, Reply, LinkFrame, Answered, Done, Failed, Cancelled, HealthChanged, Credit, Declined,
               ProcessesEnded)
# Each kind's number on the wire (wire.py): a message is pickled as a plain tuple (number, *fields).
KINDS: tuple[type, ...] = (Init, Configure, Run, Relay, Cancel, Stop, HealthChanged, Ready, Ack, Reply, LinkFrame,
                           Answered, Done, Failed, Cancelled, Accepted, Ping, Credit, Declined, ProcessesEnded)

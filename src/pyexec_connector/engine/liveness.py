"""Is a worker still reading its pipe? Pure: the pool reports when it last heard from each worker and
when it pinged it, and acts on the verdict (as uvicorn's supervisor pings its workers over a pipe).

Any message counts as an answer: a worker writes at least an acknowledgement after taking messages, so
a ping is any message that asks for nothing else. A worker that does not answer in time is *silent*:
its loop is blocked. If it is running queries, that may be honest synchronous code, which its queries'
own timeouts judge: it only stops taking new queries, and those sent to it that have not started go to
another worker. If it runs nothing, something its code left behind blocks it: it is killed and replaced."""
from __future__ import annotations

import dataclasses
import enum


class Verdict(enum.Enum):
    FINE = "fine"           # heard from recently, or a ping is on its way
    PING = "ping"           # silent for a while: send a ping now
    SILENT = "silent"       # did not answer a ping in time while running queries: route nothing more to it
    WEDGED = "wedged"       # did not answer a ping in time and runs nothing: kill and replace it


@dataclasses.dataclass(frozen=True, slots=True)
class LivenessPolicy:
    interval: float = 5.0    # seconds of silence before a ping
    timeout: float = 5.0     # seconds a ping may go unanswered

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError(f"liveness interval and timeout must be positive: {self.interval}, {self.timeout}")

    def verdict(self, now: float, last_heard: float, pinged_at: float | None, running: int) -> Verdict:
        """`last_heard`: when the worker last wrote anything; `pinged_at`: when the ping not answered yet was
        sent (None: none is); `running`: queries it runs now."""
        if pinged_at is not None and last_heard < pinged_at:
            if now - pinged_at < self.timeout:
                return Verdict.FINE
            return Verdict.SILENT if running else Verdict.WEDGED
        return Verdict.PING if now - last_heard >= self.interval else Verdict.FINE

    def next_check(self, now: float, last_heard: float, pinged_at: float | None) -> float:
        """When verdict() may next change (a time on the same clock as `now`)."""
        if pinged_at is not None and last_heard < pinged_at:
            return max(now, pinged_at + self.timeout)
        return max(now, last_heard + self.interval)

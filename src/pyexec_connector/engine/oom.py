"""Whether the kernel's out-of-memory killer explains a worker's SIGKILL: only when the kernel's own
count of OOM kills rose. A SIGKILL the worker sent itself (or another process sent) is not blamed on
memory: guessing sends operators after the wrong cause."""
from __future__ import annotations

import threading
from pathlib import Path

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _field(path: Path, name: str) -> int | None:
    """`name N` from a kernel's key-value file (memory.events, memory.oom_control, vmstat)."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def oom_kill_count(proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """The kernel's count of OOM kills for this process's memory cgroup (v2 memory.events, v1
    memory.oom_control), else the whole system's (/proc/vmstat); None when none is readable."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":                   # cgroup v2: one hierarchy
            candidates = [cgroup_root / relative / "memory.events", cgroup_root / "memory.events"]
            name = "oom_kill"
        elif "memory" in controllers.split(","):   # cgroup v1: the memory controller's own hierarchy
            candidates = [cgroup_root / "memory" / relative / "memory.oom_control",
                          cgroup_root / "memory" / "memory.oom_control"]
            name = "oom_kill"
        else:
            continue
        for candidate in candidates:            # inside a container the path may be mounted as the root
            count = _field(candidate, name)
            if count is not None:
                return count
    return _field(proc / "vmstat", "oom_kill")


class OomWitness:
    """Counts OOM kills the kernel reported since it was made: each SIGKILL it is asked about uses up one
    (two workers killed for memory at once are both explained; a later self-inflicted SIGKILL is not)."""

    def __init__(self, count=oom_kill_count):
        self._count = count
        self._lock = threading.Lock()
        self._seen = count()

    def explains_sigkill(self) -> bool:
        with self._lock:
            now = self._count()
            if now is None or self._seen is None:
                self._seen = now
                return False
            if now > self._seen:
                self._seen += 1
                return True
            self._seen = now
            return False


_witness = OomWitness()    # made at import: the connector's start is the baseline


def sigkill_hint(witness: OomWitness | None = None) -> str:
    """The words after "killed by signal SIGKILL (9)" for a worker the connector did not kill."""
    return " (the out-of-memory killer: the kernel's OOM kill count rose)" \
        if (witness or _witness).explains_sigkill() else ""

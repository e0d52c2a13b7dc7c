"""The environments on disk, one folder per key under `<environmentsDir>/envs/`:

    envs/<key>/            the environment (a venv); complete once it holds pyexec-env.json
    envs/<key>.lock        flock: held exclusively while installing or removing, shared while in use

An environment counts only once its record (pyexec-env.json) is written, last; anything else in a
folder is a failed or interrupted install and is replaced. The record's mtime is its last use. The locks
work across processes: `envs prune` does not remove what a running connector uses."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .installer import installed_size, python_of
from .requirements import EnvironmentSpec

RECORD = "pyexec-env.json"
LOCK_POLL = 0.05       # seconds between tries for a lock another process holds


@dataclasses.dataclass(frozen=True)
class Environment:
    """A complete environment: its key, folder and interpreter, and what it was made for."""

    key: str
    path: Path
    requirements: tuple[str, ...]
    size: int = 0
    last_used: float = 0.0
    install_seconds: float = 0.0

    @property
    def python(self) -> Path:
        return python_of(self.path)


class Lease:
    """A shared lock on one environment: while held, no prune or eviction removes it."""

    def __init__(self, environment: Environment, fd: int):
        self.environment = environment
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)      # closing the descriptor drops its lock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


class EnvironmentStore:
    def __init__(self, directory: Path):
        self.directory = directory
        self.envs = directory / "envs"

    @property
    def cache(self) -> Path:
        """uv's own cache (downloaded and unpacked wheels), kept beside the environments."""
        return self.directory / "uv-cache"

    def path(self, key: str) -> Path:
        return self.envs / key

    def _lock_fd(self, key: str) -> int:
        self.envs.mkdir(parents=True, exist_ok=True)
        return os.open(self.envs / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def find(self, key: str) -> Environment | None:
        """The complete environment for `key`, or None."""
        record = self.path(key) / RECORD
        try:
            data = json.loads(record.read_text())
            last_used = record.stat().st_mtime
        except (OSError, ValueError):
            return None
        return Environment(key, self.path(key), tuple(data.get("requirements", ())), int(data.get("size", 0)),
                           last_used, float(data.get("install_seconds", 0.0)))

    def touch(self, environment: Environment) -> None:
        with contextlib.suppress(OSError):
            os.utime(environment.path / RECORD)

    def complete(self, spec: EnvironmentSpec, seconds: float) -> Environment:
        """Write the record that makes the installed folder count (last, so a crash before it leaves none)."""
        path = self.path(spec.key)
        record: dict[str, Any] = {"key": spec.key, "requirements": list(spec.requirements),
                                  "requires_python": spec.requires_python, "interpreter": spec.interpreter,
                                  "runtime": spec.runtime, "install_seconds": round(seconds, 3),
                                  "created": time.time(), "size": installed_size(path)}
        scratch = path / (RECORD + ".tmp")
        scratch.write_text(json.dumps(record, indent=1))
        os.replace(scratch, path / RECORD)
        found = self.find(spec.key)
        assert found is not None
        return found

    async def exclusive(self, key: str, deadline: float) -> int:
        """The key's lock, exclusively (waiting, until loop time `deadline`, for another process's install
        or use to end). Returns its descriptor: close it to unlock."""
        fd = self._lock_fd(key)
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    if loop.time() >= deadline:
                        raise TimeoutError(f"environment {key} stayed locked by another process") from None
                    await asyncio.sleep(LOCK_POLL)
        except BaseException:
            os.close(fd)
            raise

    def lease(self, environment: Environment) -> Lease | None:
        """A shared lock on the environment, or None when it is being removed or installed right now."""
        fd = self._lock_fd(environment.key)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if self.find(environment.key) is None:      # removed before the lock was ours
            os.close(fd)
            return None
        return Lease(environment, fd)

    def entries(self) -> list[Environment]:
        """Every complete environment, least recently used first."""
        if not self.envs.is_dir():
            return []
        found = [self.find(p.name) for p in self.envs.iterdir() if p.is_dir()]
        return sorted((e for e in found if e is not None), key=lambda e: e.last_used)

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def remove_if_unused(self, key: str) -> bool:
        """Remove the environment unless a process holds it (a lease or an install). True when removed."""
        fd = self._lock_fd(key)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            with contextlib.suppress(FileNotFoundError):
                (self.path(key) / RECORD).unlink()        # it stops counting first
            shutil.rmtree(self.path(key), ignore_errors=True)
            # the lock file stays: another process may have it open, waiting, and must lock the same file
            return True
        finally:
            os.close(fd)

    def evict(self, max_bytes: int, keep: frozenset[str] = frozenset()) -> list[Environment]:
        """Remove least recently used environments not in use (and not in `keep`) until the rest take at
        most `max_bytes`. Returns those removed."""
        entries = self.entries()
        total = sum(e.size for e in entries)
        removed = []
        for entry in entries:
            if total <= max_bytes:
                break
            if entry.key in keep:
                continue
            if self.remove_if_unused(entry.key):
                total -= entry.size
                removed.append(entry)
        return removed

    def leftovers(self) -> list[Path]:
        """Folders of installs that never completed, and lock files of environments that are gone."""
        if not self.envs.is_dir():
            return []
        return [p for p in self.envs.iterdir()
                if (p.is_dir() and not (p / RECORD).is_file())
                or (p.suffix == ".lock" and not self.path(p.stem).is_dir())]

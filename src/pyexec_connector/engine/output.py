"""captureOutput: what one run printed, even while other runs print in the same process and loop.

sys.stdout and sys.stderr are replaced once by routers that look up the current run's buffers in a
context variable. Tasks the run creates inherit its context, so their prints are captured too; code
outside any capturing run writes through to the real streams. Writes below Python (a C extension
writing to file descriptor 1) are not seen."""
from __future__ import annotations

import contextvars
import io
import sys
from typing import Any

MAX_CAPTURED_CHARS = 1024 * 1024     # per stream and run; beyond, the text is cut and marked


class Captured:
    __slots__ = ("stdout", "stderr")

    def __init__(self) -> None:
        self.stdout = _Buffer()
        self.stderr = _Buffer()

    def result(self) -> dict[str, str]:
        return {"stdout": self.stdout.text(), "stderr": self.stderr.text()}


class _Buffer:
    __slots__ = ("_io", "_size", "_cut")

    def __init__(self) -> None:
        self._io = io.StringIO()
        self._size = 0
        self._cut = False

    def write(self, text: str) -> None:
        room = MAX_CAPTURED_CHARS - self._size
        if room <= 0:
            self._cut = True
            return
        if len(text) > room:
            text, self._cut = text[:room], True
        self._io.write(text)
        self._size += len(text)

    def text(self) -> str:
        value = self._io.getvalue()
        return value + "\n[output cut at %d characters]" % MAX_CAPTURED_CHARS if self._cut else value


CAPTURE: contextvars.ContextVar[Captured | None] = contextvars.ContextVar("pyexec_capture", default=None)


class _Router:
    """Stands in for sys.stdout/sys.stderr; everything but write goes to the real stream."""

    def __init__(self, real: Any, which: str):
        self._real = real
        self._which = which

    def write(self, text: str) -> int:
        captured = CAPTURE.get()
        if captured is None:
            return self._real.write(text) if self._real is not None else len(text)
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        getattr(captured, self._which).write(text)
        return len(text)

    def flush(self) -> None:
        if CAPTURE.get() is None and self._real is not None:
            self._real.flush()

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:     # encoding, fileno, isatty, buffer... of the real stream
        return getattr(self._real, name)


def install() -> None:
    """Route sys.stdout and sys.stderr through the capture (once per process)."""
    if not isinstance(sys.stdout, _Router):
        sys.stdout = _Router(sys.stdout, "stdout")
    if not isinstance(sys.stderr, _Router):
        sys.stderr = _Router(sys.stderr, "stderr")

"""pyexec-connector: run Python for a Vantiq server."""
from __future__ import annotations

from .errors import QueryError

__all__ = ["QueryError", "__version__", "version"]


def version() -> str:
    """The installed distribution's version: pyproject.toml is the one place it is written."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("pyexec-connector")
    except PackageNotFoundError:      # run from a source tree that was never installed
        return "unknown"


def __getattr__(name: str) -> str:
    # read only when asked: importlib.metadata is not worth its memory in every worker process
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

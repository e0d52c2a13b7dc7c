"""Execution engines: where user code runs. The link and the request parsing see only `Engine`."""
from .base import Engine, Job, Outcome

__all__ = ["Engine", "Job", "Outcome"]

"""Execution engines: where user code runs. The link and the request parsing see only `Engine`."""
from .base import Engine, Job, Outcome
from .stats import EngineStats

__all__ = ["Engine", "EngineStats", "Job", "Outcome"]

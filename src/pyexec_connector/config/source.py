"""SourceConfig: a source's pythonExecConfig.general, as the server sends it in configureExtension. A bad
value is logged naming its key and the source runs on the defaults; an unknown key is warned of."""
from __future__ import annotations

import logging
import os
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ValidationError, ValidationInfo, field_validator

from .. import sandbox
from .fields import MODEL_CONFIG, Flag, keys_of, problems, setting, shown, unknown_keys

log = logging.getLogger("pyexec_connector.config")   # the name logger.ini files use

# Queries waiting for a worker, per source: room for one frame of the default maxMessageBytes, or ~60,000
# trivial queries (a 5-second burst at 10,000/s even if no worker answered one meanwhile).
DEFAULT_MAX_QUEUED_BYTES = 64 * 1024 * 1024
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$", re.ASCII)
PREFIX = "pythonExecConfig.general."


class CodeGuardConfig(BaseModel):
    """codeGuard: names, attributes and modules user code may not use (checked on the AST)."""

    model_config = MODEL_CONFIG

    forbid: tuple[str, ...] = setting((), "Names (open, eval), attribute paths (os.system) and modules "
                                      "(subprocess) the code may not use.", kind="list of text",
                                      shape="a list of strings, such as [\"os\"]")


def _module_names(value: Any) -> Any:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"must be a list of module names such as [\"numpy\", \"pandas\"], not {shown(value)}")
    names: list[str] = []
    for item in value:
        if not isinstance(item, str) or not _MODULE_NAME.match(item.strip()):
            raise ValueError(f"{item!r} is not a module name (such as \"pandas\" or \"mypackage.models\")")
        if item.strip() not in names:
            names.append(item.strip())
    return tuple(names)


def _code_guard(value: Any) -> Any:
    if value is not None and not isinstance(value, dict | CodeGuardConfig):
        raise ValueError(f"must be an object such as {{\"forbid\": [\"os\"]}}, not {shown(value)}")
    return value


class SourceConfig(BaseModel):
    """pythonExecConfig.general of the source's configuration document. A key is one field, named as the
    key: `name: type = setting(default, meaning, constraints...)`; the reference and the checks follow."""

    model_config = MODEL_CONFIG

    codeCacheSize: int = setting(128, "How many compiled scripts the code cache holds (least recently used "
                                 "go first).", ge=1, le=1_000_000)
    returnRuntimeInformation: Flag = setting(False, "true: each reply carries connectorRuntimeInfo (times in "
                                             "seconds, cache figures, skippedGlobals).")
    executionMode: Literal["process", "inline"] = setting(
        "process", "Where code runs: \"process\", a pool of worker processes (protected); \"inline\", the "
        "connector's own event loop, as upstream (faster for tiny queries, not protected).")
    workers: int | None = setting(None, "The most worker processes the source runs (process mode); default: "
                                  "the number of CPUs.", ge=1, le=512)
    minWorkers: int = setting(1, "Workers kept running even when idle; more are forked as queries arrive, up "
                              "to workers.", ge=0, le=512)
    workerIdleSeconds: float = setting(60.0, "A worker beyond minWorkers idle this long ends.", gt=0)
    maxQueriesPerWorker: int = setting(0, "A worker that has finished this many queries (±10 %) is replaced; "
                                       "0: never.", ge=0)
    maxWorkerMemoryMB: int = setting(0, "A worker whose resident memory, checked after each query, is past "
                                     "this is replaced; 0: never.", ge=0)
    preload: Annotated[tuple[str, ...], BeforeValidator(_module_names)] = setting(
        (), "Modules a template process (the zygote) imports once; workers are forked from it with them "
        "loaded.", kind="list of module names")
    queriesPerWorker: int = setting(500, "The most queries one worker holds at once: a safety cap (memory, and "
                                    "how many queries one crash fails), not a pace. Workers take work when their "
                                    "loop is free, so code that awaits runs many at once and CPU-bound code one.",
                                    ge=1, le=10_000)
    executionTimeout: float = setting(300.0, "Seconds a query may run; 0: no limit. WITH timeout overrides "
                                      "it.", ge=0)
    memoryLimitMB: int | None = setting(None, "Address-space limit of each worker (RLIMIT_AS), in MB; 0 or "
                                        "absent: none.", ge=0)
    maxQueuedQueries: int | None = setting(None, "An explicit cap on the queries waiting for a free worker "
                                           "(0: none waits); beyond it, an immediate \"busy\" reply.", ge=0)
    maxQueuedBytes: int = setting(DEFAULT_MAX_QUEUED_BYTES, "What the queries waiting for a free worker may "
                                  "cost in all, in bytes (each its frame plus 1 KiB); beyond it, \"busy\".",
                                  ge=0)
    codeGuard: Annotated[CodeGuardConfig | None, BeforeValidator(_code_guard)] = setting(
        None, "{\"forbid\": [...]}: what user code may not use, checked before it runs; off when absent.",
        kind="object")
    strictParameters: Flag = setting(False, "true: code with script, and script with another name, are 400s "
                                     "(ambiguouscode, ambiguousname) instead of upstream's reading of them.")
    resultValues: Literal["plain", "rich"] = setting(
        "plain", "Which globals a plain query returns: \"plain\", what plain JSON encodes (upstream's rule); "
        "\"rich\": numpy, pandas, datetimes... too.")
    maxOpenFiles: int = setting(sandbox.DEFAULT_MAX_OPEN_FILES, "Open files of each worker process "
                                "(RLIMIT_NOFILE).", ge=16, le=1_048_576)
    maxProcessesPerWorker: int = setting(sandbox.DEFAULT_MAX_PROCESSES, "With workerUser only: processes and "
                                         "threads the worker user may have at once (RLIMIT_NPROC).",
                                         ge=8, le=4_194_304)
    keepChildProcesses: Flag = setting(False, "true: processes user code starts run until their worker ends; "
                                       "false: they end with their query (process mode; docs/PROCESSES.md).")

    @field_validator("minWorkers")
    @classmethod
    def _within_workers(cls, value: int, info: ValidationInfo) -> int:
        most = info.data.get("workers")
        if most is not None and value > most:
            raise ValueError(f"must not exceed workers ({most}), the most that may run")
        return value

    @classmethod
    def keys(cls) -> list[str]:
        return keys_of(cls)

    @classmethod
    def parse(cls, general: Any) -> tuple[SourceConfig | None, dict[str, str]]:
        """(configuration or None, {key: problem}); keys it does not know are ignored."""
        try:
            return cls.model_validate(general), {}
        except ValidationError as exc:
            return None, problems(exc, cls)

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    @property
    def min_worker_count(self) -> int:
        """Workers kept warm: minWorkers, within the most that may run."""
        return min(self.minWorkers, self.worker_count)

    @property
    def pool_shape(self) -> tuple[Any, ...]:
        """What a worker pool is built from: a change here needs a new pool, anything else does not."""
        return (self.executionMode, self.worker_count, self.memoryLimitMB or None, self.maxOpenFiles,
                self.maxProcessesPerWorker, self.preload, self.keepChildProcesses)


def source_config_problems(document: Any) -> tuple[SourceConfig | None, list[str], list[str]]:
    """What `check` says of a configureExtension document: the configuration (None when it is bad), its
    errors (the connector would log them and use the defaults) and warnings (unknown keys, ignored)."""
    section = document.get("pythonExecConfig") if isinstance(document, dict) else None
    general = section.get("general") if isinstance(section, dict) else section
    if general is None:
        return SourceConfig(), [], []
    if not isinstance(general, dict):
        return None, [f"pythonExecConfig.general must be an object, not {type(general).__name__}"], []
    warnings = unknown_keys(general, SourceConfig.keys(), PREFIX)
    guard = general.get("codeGuard")
    if isinstance(guard, dict):
        warnings += unknown_keys(guard, CodeGuardConfig.model_fields, PREFIX + "codeGuard.")
    config, found = SourceConfig.parse(general)
    return config, [f"{PREFIX}{key}: {problem}" for key, problem in found.items()], warnings


def parse_source_config(document: Any, source_name: str = "?") -> SourceConfig:
    """Every configure is a fresh configuration. Unknown keys: a warning. Wrong types: an error in the
    log and the defaults."""
    config, errors, warnings = source_config_problems(document)
    for warning in warnings:
        log.warning("source %s: %s", source_name, warning)
    if config is None:
        log.error("source %s: bad configuration (%s); using the defaults", source_name, "; ".join(errors))
        return SourceConfig()
    return config

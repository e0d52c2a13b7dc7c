"""Running compiled user code: shared by every engine (inline here, and inside worker processes)."""
from __future__ import annotations

import ast
import asyncio
import contextvars
import inspect
import traceback
import types
from collections.abc import Coroutine
from time import perf_counter
from typing import Any

from .. import errors, sandbox, values
from ..cache import CodeCache
from ..errors import QueryError
from . import output
from .base import Job, Outcome
from .guard import CodeGuard

COMPILE_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
_CO_COROUTINE = inspect.CO_COROUTINE     # a module whose top level awaits
RESERVED_GLOBALS = frozenset({"__name__", "__file__", "connector_connection", "connector_context",
                              "__builtins__"})
_RESERVED = tuple(RESERVED_GLOBALS)
# never data: left out without a word (not in skippedGlobals either)
_CODE_TYPES = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)


def compile_code(source: str, filename: str, guard: CodeGuard | None = None) -> types.CodeType:
    """Compile (top-level await allowed), checking the syntax tree against the guard first."""
    try:
        if not guard:
            return compile(source, filename, "exec", flags=COMPILE_FLAGS, dont_inherit=True)
        tree = compile(source, filename, "exec", flags=COMPILE_FLAGS | ast.PyCF_ONLY_AST, dont_inherit=True)
        guard.check(tree, filename)
        return compile(tree, filename, "exec", flags=COMPILE_FLAGS, dont_inherit=True)
    except (SyntaxError, ValueError) as exc:   # ValueError: NUL bytes in the source
        if isinstance(exc, SyntaxError):
            params = [type(exc).__name__, exc.filename or filename, exc.lineno, exc.offset,
                      (exc.text or "").rstrip("\n")]
            detail = exc.msg
        else:
            params = [type(exc).__name__, filename, None, None, str(exc)]
            detail = str(exc)
        raise QueryError(errors.SYNTAX_ERROR,
                         "Compiling {1} failed with {0} at line {2}, offset {3}: {4}  (" + detail.replace(
                             "{", "(").replace("}", ")") + ")", params) from None


def resolve_code(cache: CodeCache, job: Job, info: dict[str, Any] | None,
                 guard: CodeGuard | None = None) -> types.CodeType:
    """The code object for the job, from the cache when current, else compiled (and cached when asked)."""
    request = job.request
    key = request.cache_key
    if key is not None and request.replace:
        cache.drop(key)
    if job.source_text is None:                       # only a name: must be cached
        entry = cache.get(key, any_version=True) if key is not None else None
        if entry is None:
            raise QueryError(errors.NO_CACHE, "No code is cached under the name {0}; send the code with it.",
                             [key])
        _note(info, using_cached=True, newCacheEntry=False)
        return entry.code
    if key is not None and request.cache_code:
        entry = cache.get(key, job.fingerprint)
        if entry is not None:
            if info is not None:     # the common case, cached code nobody asked figures of: no call
                _note(info, using_cached=True, newCacheEntry=False)
            return entry.code
    started = perf_counter()
    code = compile_code(job.source_text, request.filename, guard)
    stored = key is not None and request.cache_code
    if key is not None and stored:
        cache.put(key, code, job.fingerprint)
    _note(info, using_cached=False, newCacheEntry=stored, compileTime=perf_counter() - started)
    return code


def _note(info: dict[str, Any] | None, **values: Any) -> None:
    if info is not None:
        info.update(values)


def execution_error(exc: BaseException) -> QueryError:
    """An exception from user code as the reply the caller sees: its type and the user's traceback."""
    if isinstance(exc, QueryError):
        return exc
    if isinstance(exc, MemoryError):
        return QueryError(errors.MEMORY_LIMIT, "The code ran out of memory (memoryLimitMB, or the machine's): {0}",
                          [str(exc) or "MemoryError"])
    hint = sandbox.limit_hint(exc)
    if hint is not None:
        return QueryError(errors.EXECUTION_EXCEPTION, "Executing the code raised {0}: {1}; {2}",
                          [type(exc).__name__, str(exc), hint])
    tb = exc.__traceback__
    # Drop the connector's own frames: the caller wants the trace from their code down.
    while tb is not None and not _is_user_frame(tb.tb_frame):
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return QueryError(errors.EXECUTION_EXCEPTION, "Executing the code raised {0}: {1}",
                      [type(exc).__name__, text])


def _is_user_frame(frame: types.FrameType) -> bool:
    return "pyexec_connector" not in frame.f_code.co_filename


async def execute(code: types.CodeType, run_globals: dict[str, Any]) -> None:
    """Run the module code; top-level `await` is allowed. User exceptions come out as QueryError."""
    try:
        result = eval(code, run_globals)  # noqa: S307 - running user code is this connector's job
        if code.co_flags & inspect.CO_COROUTINE:
            await result
    except QueryError:
        raise
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        raise execution_error(exc) from None


def results_json(run_globals: dict[str, Any], limit: tuple[str, ...] | None, rich: bool = False,
                 skipped: list[dict[str, str]] | None = None) -> str:
    """pythonCallResults as JSON text. Upstream's rule by default: the globals plain JSON can encode, the
    others left out (and listed in `skipped`). Globals named in limitReturnTo, and every global when the
    source sets resultValues "rich", go through the rich encoder (numpy, pandas, datetimes...); a named
    one that still cannot be encoded fails the query (QueryError naming it)."""
    if limit is not None:
        names = [k for k in limit if k in run_globals and k not in RESERVED_GLOBALS]
        # asked for by name: even a function or a module is the caller's business (and a 400)
        return values.globals_json({k: run_globals[k] for k in names}, True, limit, skipped)
    # a copy less the reserved names, in C whatever the number of globals; values of plain JSON types
    # (globals_json checks as much next) cannot be code, so only other values are looked at one by one
    candidates = run_globals.copy()
    pop = candidates.pop
    for name in _RESERVED:
        pop(name, None)
    if not values.JSON_TYPES.issuperset(map(type, candidates.values())):
        candidates = {k: v for k, v in candidates.items() if not isinstance(v, _CODE_TYPES)}
    return values.globals_json(candidates, rich, (), skipped)


class RunTracker:
    """The asyncio tasks one run's code scheduled (directly or through tasks of its own), so that a
    codeHandlesReturn query is known to be finished — or known to have failed without replying."""

    __slots__ = ("tasks",)

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    def track(self, task: asyncio.Task) -> None:
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        # keep failed tasks: their exception is the query's answer
        if task.cancelled() or task.exception() is None:
            self.tasks.discard(task)

    def failure(self) -> BaseException | None:
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                return task.exception()
        return None

    def pending(self) -> set[asyncio.Task]:
        return {t for t in self.tasks if not t.done()}

    def cancel_all(self) -> None:
        for task in self.tasks:
            task.cancel()


CURRENT_RUN: contextvars.ContextVar[RunTracker | None] = contextvars.ContextVar("pyexec_run", default=None)


def install_task_tracking(loop: asyncio.AbstractEventLoop) -> None:
    """Make every task created while a run's context is current belong to that run."""
    previous = loop.get_task_factory()
    if getattr(previous, "_pyexec_tracking", False):
        return

    def factory(loop: asyncio.AbstractEventLoop, coro, **kwargs):
        task = previous(loop, coro, **kwargs) if previous else asyncio.Task(coro, loop=loop, **kwargs)
        run = CURRENT_RUN.get()
        if run is not None:
            run.track(task)  # type: ignore[arg-type]  # a task factory may return any Future; ours are Tasks
        return task

    factory._pyexec_tracking = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)


async def await_code_reply(tracker: RunTracker, done: asyncio.Future) -> None:
    """Wait until the code sent its terminal reply; raise if its tasks failed or ended without one."""
    while not done.done():
        failure = tracker.failure()
        if failure is not None:
            raise execution_error(failure)
        pending = tracker.pending()
        if not pending:
            raise QueryError(errors.NO_REPLY, "The code set codeHandlesReturn but finished without sending "
                                              "a final reply (status 200 or 204) or an error.")
        await asyncio.wait(pending | {done}, return_when=asyncio.FIRST_COMPLETED)


def dry_run(cache: CodeCache, job: Job, guard: CodeGuard | None) -> Outcome:
    """dryRun: compile and guard only. Nothing runs and the cache is left as it was."""
    request = job.request
    started = perf_counter()
    if job.source_text is None:
        key = request.cache_key
        if key is None or key not in cache:
            raise QueryError(errors.NO_CACHE, "No code is cached under the name {0}; send the code with it.",
                             [key])
        report: dict[str, Any] = {"name": request.filename, "compiled": False, "cached": True}
    else:
        compile_code(job.source_text, request.filename, guard)
        report = {"name": request.filename, "compiled": True, "compileTime": perf_counter() - started}
    report["codeGuard"] = "passed" if guard else "off"
    return Outcome(results_json="{}", dry_run=report)


async def run_job(cache: CodeCache, job: Job, connection: Any, channel: Any,
                  guard: CodeGuard | None = None) -> Outcome:
    """One query, start to end, on the current loop: the same steps inline and in a worker process."""
    started = start_job(cache, job, connection, channel, guard)
    return started if isinstance(started, Outcome) else await started


def start_job(cache: CodeCache, job: Job, connection: Any, channel: Any,
              guard: CodeGuard | None = None) -> Outcome | Coroutine[Any, Any, Outcome]:
    """One query: run to its end at once when its code cannot await (no top-level `await`, not
    codeHandlesReturn) and return the Outcome; else return the coroutine that runs it, to be awaited
    (in a task of its own, where it must be cancellable). Saves a task per query for plain code."""
    request = job.request
    if request.dry_run:
        return dry_run(cache, job, guard)
    info: dict[str, Any] | None = None
    if job.runtime_info:    # `name` only when there is one, as upstream
        info = {} if request.cache_key is None else {"name": request.cache_key}
    code = resolve_code(cache, job, info, guard)
    run_globals: dict[str, Any] = {"__name__": "__main__", "__file__": request.filename,
                                   "connector_connection": connection, "connector_context": channel.context}
    run_globals.update(request.preset_values)
    if code.co_flags & _CO_COROUTINE or request.code_handles_return:
        return _run_awaiting(cache, job, channel, code, run_globals, info)
    started = perf_counter() if info is not None else 0.0
    if not request.capture_output:
        # code that cannot await runs to its end right here: no task of its can outlive the query as
        # part of it, so a run scope (task tracker, capture) would be made and dropped unused
        _run_plain(code, run_globals)
        return _outcome(cache, job, run_globals, info, None, started)
    with _RunScope(True) as scope:
        _run_plain(code, run_globals)
    return _outcome(cache, job, run_globals, info, scope.captured, started)


def _run_plain(code: types.CodeType, run_globals: dict[str, Any]) -> None:
    try:
        eval(code, run_globals)  # noqa: S307 - running user code is this connector's job
    except QueryError:
        raise
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        raise execution_error(exc) from None


async def _run_awaiting(cache: CodeCache, job: Job, channel: Any, code: types.CodeType,
                        run_globals: dict[str, Any], info: dict[str, Any] | None) -> Outcome:
    with _RunScope(job.request.capture_output) as scope:
        started = perf_counter() if info is not None else 0.0
        await execute(code, run_globals)
    if job.request.code_handles_return:
        try:
            await await_code_reply(scope.tracker, channel.done_future())
        finally:
            if not channel.terminated:
                scope.tracker.cancel_all()
        return Outcome()
    return _outcome(cache, job, run_globals, info, scope.captured, started)


class _RunScope:
    """While user code of one run executes: the tasks it creates belong to its tracker, and what it
    prints goes to its capture. A class, not a generator contextmanager: this is on every query."""

    __slots__ = ("tracker", "captured", "_run_token", "_capture_token")

    def __init__(self, capture_output: bool):
        self.tracker = RunTracker()
        self.captured = output.Captured() if capture_output else None

    def __enter__(self) -> _RunScope:
        self._run_token = CURRENT_RUN.set(self.tracker)
        self._capture_token = output.CAPTURE.set(self.captured)
        return self

    def __exit__(self, *exc_info: object) -> None:
        CURRENT_RUN.reset(self._run_token)
        output.CAPTURE.reset(self._capture_token)


def _outcome(cache: CodeCache, job: Job, run_globals: dict[str, Any], info: dict[str, Any] | None,
             captured: output.Captured | None, started: float) -> Outcome:
    """`started`: perf_counter() when the code began, read only when figures were asked for (`info`)."""
    if info is None:
        results = results_json(run_globals, job.request.limit_return_to, job.rich_results)
        return Outcome(results, None, captured.result() if captured is not None else None)
    executed = perf_counter() - started
    skipped: list[dict[str, str]] = []
    results = results_json(run_globals, job.request.limit_return_to, job.rich_results, skipped)
    info.update(executionTime=executed, currentCacheSize=len(cache), cacheCapacity=cache.capacity,
                skippedGlobals=skipped)
    return Outcome(results, info, captured.result() if captured is not None else None)

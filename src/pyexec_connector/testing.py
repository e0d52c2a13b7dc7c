"""Run a script the way the connector runs it, from a script author's own tests.

`run_script` (and `run_script_async`) start the built-in stand-in of a Vantiq server on a free loopback
port, connect a real connector source to it with the source configuration given, send one query and
return every reply it got: the same engine, limits and rules as a deployed source, with no account.
`ScriptRunner` keeps one stand-in and source for several runs (a worker's module state lives on between
them, as on a deployed source)::

    from pyexec_connector.testing import run_script

    def test_total():
        reply = run_script(file="analytics/stats.py", presets={"samples": [1, 2, 3]})
        assert reply.status == 200, reply.error_text
        assert reply.results["total"] == 6

`pyexec-connector exec` is the same thing from a shell.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import build_server_config, source_config_problems
from .connector import Connector
from .devserver import DevServer

log = logging.getLogger(__name__)

__all__ = ["ScriptReply", "ScriptRunner", "SourceConfigError", "run_script", "run_script_async"]

SOURCE = "pythonSource"
STATUS_PARTIAL = 100
# How long a run may take beyond its own timeout before the runner gives up on a reply: the connector
# answers a timed-out query itself, after killing its worker (a couple of seconds at most).
REPLY_MARGIN = 30.0
# What a source does by default (SourceConfig's executionTimeout): the wait for a reply when neither
# the run nor the source configuration names a timeout.
DEFAULT_TIMEOUT = 300.0
_TRACEBACK_START = "Traceback (most recent call last):"


class SourceConfigError(ValueError):
    """The source configuration given to a runner is not one a source would accept; `problems` lists
    each problem with its key."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class ScriptReply:
    """Every reply frame one run got, in order (`{"status": ..., "body": ...}`; the last is terminal),
    and the notifications the code sent while it ran."""

    replies: list[dict[str, Any]]
    notifications: list[Any] = field(default_factory=list)

    @property
    def status(self) -> int:
        return int(self.replies[-1]["status"])

    @property
    def ok(self) -> bool:
        return self.status < 300

    @property
    def body(self) -> Any:
        return self.replies[-1].get("body")

    @property
    def results(self) -> dict[str, Any]:
        """`pythonCallResults` of a plain run: the globals it returned."""
        if not self.ok or not isinstance(self.body, dict) or "pythonCallResults" not in self.body:
            raise AssertionError(f"the run did not return pythonCallResults: {self.error_text or self.body!r}")
        return self.body["pythonCallResults"]

    @property
    def error_code(self) -> str | None:
        body = self.body
        return body.get("messageCode") if not self.ok and isinstance(body, dict) else None

    @property
    def error_message(self) -> str | None:
        """The error's message with its parameters filled in; a traceback parameter is shortened to its
        last line (it is in `traceback`)."""
        body = self.body
        if self.ok or not isinstance(body, dict):
            return None
        raw = list(body.get("parameters") or [])
        params = [_exception_line(p, raw) if _is_traceback(p) else p for p in raw]
        template = str(body.get("messageTemplate") or body.get("messageCode") or "error")
        for index, value in enumerate(params):
            template = template.replace("{" + str(index) + "}", value if isinstance(value, str) else json.dumps(value))
        return template

    @property
    def traceback(self) -> str | None:
        """The user code's traceback, when the error carries one (only the code's own frames)."""
        body = self.body
        if self.ok or not isinstance(body, dict):
            return None
        return next((p for p in body.get("parameters") or [] if _is_traceback(p)), None)

    @property
    def error_text(self) -> str | None:
        """messageCode, message and traceback in one text, for an assertion's message."""
        if self.ok:
            return None
        return "\n".join(p for p in (f"{self.error_code}: {self.error_message}", self.traceback) if p)


def _is_traceback(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(_TRACEBACK_START)


def _exception_line(traceback: str, params: list[Any]) -> str:
    """A traceback's last line, without the exception's type when another parameter names it already
    ("raised {0}: {1}" reads "raised ZeroDivisionError: division by zero")."""
    lines = [line for line in traceback.splitlines() if line.strip()]
    last = lines[-1] if lines else traceback
    head, sep, message = last.partition(": ")
    named = {p for p in params if isinstance(p, str)}
    if sep and (head in named or head.rpartition(".")[2] in named):     # json.decoder.JSONDecodeError
        return message
    return last


def source_document(source_config: Mapping[str, Any] | None = None, mode: str | None = None) -> dict[str, Any]:
    """The source's configuration document (`{"pythonExecConfig": {"general": {...}}}`), with `mode`
    as its executionMode; checked as the connector checks it. Raises SourceConfigError."""
    document = json.loads(json.dumps(dict(source_config or {})))        # a copy, and JSON only
    if document and "pythonExecConfig" not in document:
        raise SourceConfigError(["a source configuration is an object {\"pythonExecConfig\": {\"general\": "
                                 "{...}}}, as in the source's definition; it has no pythonExecConfig"])
    section = document.setdefault("pythonExecConfig", {})
    if not isinstance(section, dict):
        raise SourceConfigError(["pythonExecConfig must be an object"])
    general = section.setdefault("general", {})
    if not isinstance(general, dict):
        raise SourceConfigError(["pythonExecConfig.general must be an object"])
    if mode is not None:
        general["executionMode"] = mode
    config, problems, _unknown = source_config_problems(document)
    if config is None or problems:
        raise SourceConfigError(problems or ["the source configuration is not valid"])
    return document


def query_parameters(code: str, *, name: str | None = None, presets: Mapping[str, Any] | None = None,
                     code_handles_return: bool = False, limit_return_to: list[str] | str | None = None,
                     capture_output: bool = False, timeout: float | None = None) -> dict[str, Any]:
    """The WITH clause of the query that runs `code`: what the server sends for it."""
    params: dict[str, Any] = {"code": code}
    if name is not None:
        params["name"] = name
    if presets:
        params["presetValues"] = dict(presets)
    if code_handles_return:
        params["codeHandlesReturn"] = True
    if limit_return_to is not None:
        params["limitReturnTo"] = limit_return_to
    if capture_output:
        params["captureOutput"] = True
    if timeout is not None:
        params["timeout"] = timeout
    return params


class ScriptRunner:
    """A stand-in server and one connector source on loopback, for any number of runs::

        async with ScriptRunner(mode="process") as runner:
            reply = await runner.run("total = sum(values)", presets={"values": [1, 2]})
    """

    def __init__(self, *, source_config: Mapping[str, Any] | None = None, mode: str | None = None):
        self.document = source_document(source_config, mode)
        general = self.document["pythonExecConfig"]["general"]
        self.default_timeout = float(general.get("executionTimeout", DEFAULT_TIMEOUT))
        self.server = DevServer(token=secrets.token_urlsafe(24), sources=(SOURCE,))
        self._connector: Connector | None = None
        self._serving: asyncio.Task | None = None

    async def start(self, timeout: float = 60.0) -> None:
        """Start the stand-in and the connector, and wait until the source is configured."""
        await self.server.start()
        self.server.set_source_config(SOURCE, document=self.document)
        # tcpProbePort 0: a script that declares itself healthy must not need port 8000 to be free
        config = build_server_config({"targetServer": self.server.url, "authToken": self.server.token,
                                      "sources": SOURCE, "tcpProbePort": "0", "shutdownGraceSeconds": "5"},
                                     env={}, file="(pyexec_connector.testing)")
        self._connector = Connector(config, backoff_initial=0.1, backoff_max=1.0, environ={})
        self._serving = asyncio.create_task(self._connector.run())
        ready = asyncio.create_task(self._connector.wait_ready(timeout=timeout))
        try:
            done, _ = await asyncio.wait({ready, self._serving}, return_when=asyncio.FIRST_COMPLETED)
            if ready not in done:       # the connector ended (and raised) before the source was ready
                raise RuntimeError("the connector stopped before its source was ready")
            ready.result()
        except BaseException:
            ready.cancel()
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop the connector gracefully (what the code still runs gets shutdownGraceSeconds, 5 s), then
        the stand-in."""
        try:
            if self._connector is not None and self._serving is not None:
                self._connector.stop()
                await asyncio.wait([self._serving], timeout=60)
                if not self._serving.done():
                    self._serving.cancel()
                elif not self._serving.cancelled() and self._serving.exception() is not None:
                    log.warning("the connector ended with %r", self._serving.exception())
        finally:
            self._connector = None
            self._serving = None
            await self.server.stop()

    async def __aenter__(self) -> ScriptRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stream(self, params: Mapping[str, Any], timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Send one query (its WITH parameters, see `query_parameters`) and yield each reply frame as it
        arrives, `{"status", "body"}`, up to the terminal one. `timeout`: how long to wait for the
        terminal reply (default: the run's timeout, else the source's, plus a margin; 0: no limit)."""
        if timeout is None:
            run_timeout = float(params.get("timeout", self.default_timeout))
            timeout = run_timeout + REPLY_MARGIN if run_timeout > 0 else 0
        replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        address = f"exec-{secrets.token_hex(8)}"
        self.server.route_replies(address, replies.put_nowait)
        await self.server.send_query(SOURCE, dict(params), address=address)
        self.server.forget(address)         # the route takes the replies
        async with asyncio.timeout(timeout or None):
            while True:
                frame = await replies.get()
                yield {"status": frame.get("status"), "body": frame.get("body")}
                if frame.get("status") != STATUS_PARTIAL:
                    return

    async def run(self, code: str | None = None, *, file: str | os.PathLike | None = None,
                  name: str | None = None, presets: Mapping[str, Any] | None = None,
                  code_handles_return: bool = False, limit_return_to: list[str] | str | None = None,
                  capture_output: bool = False, timeout: float | None = None) -> ScriptReply:
        """Run `code` (or the text of `file`, named after it) with `presets` as its global variables;
        the other arguments are the query's WITH parameters. Returns every reply, and the notifications
        the code sent until its terminal reply."""
        code, name = _code_and_name(code, file, name)
        params = query_parameters(code, name=name, presets=presets, code_handles_return=code_handles_return,
                                  limit_return_to=limit_return_to, capture_output=capture_output, timeout=timeout)
        seen = len(self.server.notifications[SOURCE])
        replies = [frame async for frame in self.stream(params)]
        return ScriptReply(replies, list(self.server.notifications[SOURCE][seen:]))


def _code_and_name(code: str | None, file: str | os.PathLike | None, name: str | None) -> tuple[str, str | None]:
    if (code is None) == (file is None):
        raise TypeError("give either code or file")
    if file is not None:
        return Path(file).read_text(encoding="utf-8"), name or os.fspath(file)
    assert code is not None
    return code, name


async def run_script_async(code: str | None = None, *, file: str | os.PathLike | None = None,
                           name: str | None = None, presets: Mapping[str, Any] | None = None,
                           code_handles_return: bool = False, limit_return_to: list[str] | str | None = None,
                           capture_output: bool = False, timeout: float | None = None,
                           mode: str | None = None, source_config: Mapping[str, Any] | None = None) -> ScriptReply:
    """One run on a fresh stand-in and source (see `ScriptRunner.run` for the arguments; `mode`:
    "process", the default, or "inline"; `source_config`: the source's configuration document). The
    notifications include those the code sent after its terminal reply, until it finished (or 5 s)."""
    runner = ScriptRunner(source_config=source_config, mode=mode)
    await runner.start()
    try:
        code, name = _code_and_name(code, file, name)
        params = query_parameters(code, name=name, presets=presets, code_handles_return=code_handles_return,
                                  limit_return_to=limit_return_to, capture_output=capture_output, timeout=timeout)
        replies = [frame async for frame in runner.stream(params)]
    finally:
        await runner.stop()      # lets the code's remaining tasks finish: their notifications arrive
    return ScriptReply(replies, list(runner.server.notifications[SOURCE]))


def run_script(code: str | None = None, **options: Any) -> ScriptReply:
    """`run_script_async` for synchronous tests (it runs its own event loop: not from inside one)."""
    return asyncio.run(run_script_async(code, **options))

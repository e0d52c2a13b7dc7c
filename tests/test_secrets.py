"""The access token never shows: not in logs at any level (websockets and aiohttp included), not in
/metrics, /healthz or /readyz, not in error replies, not in what user code can ask for."""
import asyncio
import contextlib
import json
import logging
import os

import aiohttp
import pytest

from .conftest import SOURCE, TOKEN, console_command, free_port

SLICES = {TOKEN[i:i + 12] for i in range(len(TOKEN) - 11)}


def leaks(text: str) -> list[str]:
    """The token, or any 12-character slice of it, wherever it occurs in `text`."""
    return sorted(s for s in SLICES if s in text)


class Capture(logging.Handler):
    """Every record, formatted with its traceback, as an operator's log file would hold it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def everything_at_debug():
    names = ["", "pyexec_connector", "websockets", "websockets.client", "aiohttp", "aiohttp.client",
             "aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.websocket", "asyncio"]
    loggers = [logging.getLogger(n) for n in names]
    before = [(lg.level, lg.disabled) for lg in loggers]
    capture = Capture()
    root = logging.getLogger()
    root.addHandler(capture)
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        for lg, (level, disabled) in zip(loggers, before, strict=True):
            lg.setLevel(level)
            lg.disabled = disabled


USER_CODE_LOOKS = """
import os
config = connector_connection.get_server_config()
environment = dict(os.environ)
connection = repr(vars(connector_connection))
context = repr(connector_context)
names = sorted(globals())
"""


async def test_busy_connector_at_debug_through_faults_never_shows_the_token(server, start_connector):
    replies = []

    async def query(params, **kw):
        result = await server.query(params, **kw)
        replies.extend(result.replies)
        return result

    with everything_at_debug() as capture:
        # no redacting filter anywhere on the way to this capture: what it sees is what the code logged,
        # so a clean capture proves the token never reaches a log call (whatever its length)
        from pyexec_connector.logsetup import RedactingFilter
        assert not any(isinstance(f, RedactingFilter) for h in logging.getLogger().handlers for f in h.filters)
        port = free_port()
        running = await start_connector(maxMessageBytes=1024 * 1024, documentTimeout=0.5, metricsPort=port)
        server.put_document("doc.py", "from_doc = 1")
        server.put_document("broken.py", "x = 1", fault="error")
        server.put_document("hangs.py", "x = 1", fault="hang")
        seen = await query({"code": USER_CODE_LOOKS})
        assert seen.status == 200 and "authToken" not in seen.results["config"]
        for n in range(30):
            await query({"code": f"x = {n}"})
            await query({"code": "raise RuntimeError(str(connector_connection.get_server_config()))"})
            await query({"script": ("doc.py", "missing.py", "broken.py")[n % 3]})
            if n % 10 == 0:
                await query({"script": "hangs.py"})
                await query({"code": "x = 1", "presetValues": {"b": "b" * 2_000_000}})      # over the limit
                await server.send_raw(SOURCE, '{"op": "query", "messageHeaders": {"REPLY_ADDR_HEADER": "z"}, "ob')
                await server.drop(SOURCE)
                await server.wait_attached(SOURCE)
            if n % 10 == 5:
                server.close_during_handshake("validate", 1)
                await server.request_reconnect(SOURCE)
                await server.drop(SOURCE)
                await server.wait_attached(SOURCE)
        server.refuse(SOURCE, 409, "io.vantiq.source.already.served", "Already served.")
        await server.drop(SOURCE)
        await asyncio.sleep(0.3)
        server.accept(SOURCE)
        await running.connector.wait_ready(timeout=10)
        await query({"code": "done = True"})
        endpoints = []
        async with aiohttp.ClientSession() as http:
            for path in ("/metrics", "/healthz", "/readyz"):
                async with http.get(f"http://127.0.0.1:{port}{path}") as response:
                    endpoints.append(await response.text())
        await running.stop()
    text = "\n".join(capture.lines)
    assert len(capture.lines) > 500, "the capture did not see a busy DEBUG log"
    assert any(line.startswith("DEBUG websockets") or "pyexec_connector.wire" in line for line in capture.lines)
    assert "system.credentials" not in text or "redacted" in text
    assert leaks(text) == [], [line[:300] for line in capture.lines if leaks(line)][:5]
    assert leaks(json.dumps(replies + server.stray_replies)) == [], "the token is in a reply"
    assert leaks(json.dumps(seen.results)) == [], "user code can see the token"
    assert "pyexec_" in endpoints[0], "not the metrics page"
    assert leaks("\n".join(endpoints)) == [], "the token is in the metrics or health endpoints"


async def test_console_command_at_debug_everywhere_with_the_token_from_the_environment(tmp_path, server):
    """The real command, every logger at DEBUG by logger.ini, the token given in CONNECTOR_AUTH_TOKEN."""
    conf = tmp_path / "serverConfig"
    conf.mkdir()
    (conf / "server.config").write_text(f"targetServer = {server.url}\nsources = {SOURCE}\n")
    (conf / "logger.ini").write_text(
        "[loggers]\nkeys=root,websockets,aiohttp\n[handlers]\nkeys=h\n[formatters]\nkeys=f\n"
        "[logger_root]\nlevel=DEBUG\nhandlers=h\n"
        "[logger_websockets]\nlevel=DEBUG\nhandlers=\nqualname=websockets\n"
        "[logger_aiohttp]\nlevel=DEBUG\nhandlers=\nqualname=aiohttp\n"
        "[handler_h]\nclass=StreamHandler\nlevel=DEBUG\nformatter=f\nargs=(sys.stdout,)\n"
        "[formatter_f]\nformat=%(levelname)s %(name)s: %(message)s\n")
    server.put_document("doc.py", "from_doc = 1")
    env = {**os.environ, "CONNECTOR_AUTH_TOKEN": TOKEN}
    proc = await asyncio.create_subprocess_exec(*console_command(), cwd=tmp_path, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        seen = await server.query({"code": USER_CODE_LOOKS})
        assert seen.status == 200
        assert "CONNECTOR_AUTH_TOKEN" not in seen.results["environment"]
        assert (await server.query({"script": "doc.py"})).results == {"from_doc": 1}
        await server.query({"code": "raise RuntimeError('boom')"})
        await server.drop(SOURCE)
        await server.wait_attached(SOURCE, timeout=30)
        await server.request_reconnect(SOURCE)
        await server.wait_attached(SOURCE, timeout=30)
        await server.query({"code": "x = 1"})
    finally:
        proc.terminate()
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = output.decode()
    assert proc.returncode == 0, text
    assert "DEBUG websockets" in text or "DEBUG pyexec_connector.wire" in text
    assert leaks(text) == []
    assert leaks(json.dumps(seen.results)) == []


def test_last_line_of_defence_withholds_pieces_of_the_token():
    from pyexec_connector.logsetup import RedactingFilter
    flt = RedactingFilter(TOKEN)
    whole = logging.LogRecord("x", logging.INFO, __file__, 1, "token %s here", (TOKEN,), None)
    flt.filter(whole)
    assert whole.getMessage() == "token *** here"
    cut = logging.LogRecord("x", logging.DEBUG, __file__, 1, "> TEXT '...%s' [101 bytes]", (TOKEN[-15:],), None)
    flt.filter(cut)
    assert leaks(cut.getMessage()) == [] and "withheld" in cut.getMessage()
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "nothing secret", None, None)
    flt.filter(plain)
    assert plain.getMessage() == "nothing secret"


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_user_code_cannot_ask_for_the_token(server, start_connector, mode):
    server.set_source_config(SOURCE, {"executionMode": mode, "workers": 1})
    await start_connector()
    seen = await server.query({"code": USER_CODE_LOOKS + "import sys\nargv = sys.argv\n"})
    assert seen.status == 200 and "authToken" not in seen.results["config"]
    assert leaks(json.dumps(seen.results)) == []


def test_a_short_secret_is_not_looked_for_in_log_text():
    """A one-character token would turn every 'x' into '***' (pye***ec-connector): below the safe length
    the filter leaves text alone; the sweep above shows the token never reaches a log call anyway."""
    from pyexec_connector.logsetup import MIN_REDACTED_LENGTH, RedactingFilter
    for secret in ("x", "e", "ab", "x" * (MIN_REDACTED_LENGTH - 1)):
        flt = RedactingFilter(secret)
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "pyexec-connector %s starting; send it again "
                                   "to exit at once; unexpected error", ("0.1.0",), None)
        flt.filter(record)
        assert record.getMessage() == ("pyexec-connector 0.1.0 starting; send it again to exit at once; "
                                       "unexpected error")
    long_enough = "x" * MIN_REDACTED_LENGTH
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a %s b", (long_enough,), None)
    RedactingFilter(long_enough).filter(record)
    assert record.getMessage() == "a *** b"


async def test_console_command_with_a_one_character_token_logs_readable_lines(tmp_path):
    """The real command, token `x`, everything at DEBUG: lines stay as written, none withheld."""
    from pyexec_connector.devserver import DevServer
    async with DevServer(token="x", sources=(SOURCE,)) as server:
        (tmp_path / "server.config").write_text(f"targetServer = {server.url}\nauthToken = x\nsources = {SOURCE}\n")
        proc = await asyncio.create_subprocess_exec(*console_command(), "--log-level", "DEBUG", cwd=tmp_path,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            await server.wait_attached(SOURCE, timeout=30)
            assert (await server.query({"code": "x = 'exe'"})).results == {"x": "exe"}
        finally:
            proc.terminate()
            output, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = output.decode()
    assert proc.returncode == 0, text
    assert "pyexec-connector " in text and " starting" in text and "connected and configured" in text
    assert "***" not in text and "withheld" not in text, text
    assert "system.credentials" not in text      # the validate frame itself is still redacted at its source


def test_links_of_one_source_share_one_redacting_filter_on_its_wire_logger():
    from pyexec_connector.config import build_server_config
    from pyexec_connector.link import SourceLink

    name = "filterCountSource"
    config = build_server_config({"targetServer": "http://127.0.0.1:1", "authToken": TOKEN, "sources": name})
    wire_log = logging.getLogger(f"pyexec_connector.wire.{name}")
    for _ in range(5):        # e.g. `check`, then the connector, in one process
        SourceLink(name, config, handler=None, reconnect_secret="r")     # type: ignore[arg-type]
    assert len(wire_log.filters) == 1
    other = build_server_config({"targetServer": "http://127.0.0.1:1", "authToken": TOKEN + "-other",
                                 "sources": name})
    SourceLink(name, other, handler=None, reconnect_secret="r")      # type: ignore[arg-type]
    assert len(wire_log.filters) == 2              # another token is looked for too

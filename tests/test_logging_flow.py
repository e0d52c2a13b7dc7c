"""Logging never blocks the loop (a stalled stdout costs log lines, not queries), and a flood of bad
frames costs a bounded number of log lines: through the real console command."""
import asyncio
import logging
import re

from pyexec_connector.logqueue import RateLimitFilter

from .conftest import SOURCE, TOKEN, console_command


async def _spawn(tmp_path, server, extra=""):
    (tmp_path / "serverConfig").mkdir(exist_ok=True)
    (tmp_path / "serverConfig" / "server.config").write_text(
        f"targetServer = {server.url}\nauthToken = {TOKEN}\nsources = {SOURCE}\n{extra}")
    return await asyncio.create_subprocess_exec(
        *console_command(), cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)


async def _stop(proc) -> str:
    proc.terminate()
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    return output.decode()


async def test_a_stdout_nobody_reads_costs_log_lines_not_queries(tmp_path, server):
    proc = await _spawn(tmp_path, server)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        # Each publish is one INFO line: far more than the pipe (64 KiB) and the log queue hold.
        for _ in range(20_000):
            await server.send_frame(SOURCE, {"op": "publish", "object": {"n": 1}})
        # The connector's stdout is full and nobody reads it: queries are answered all the same.
        for n in range(5):
            result = await server.query({"code": "x = n + 1", "presetValues": {"n": n}}, timeout=60)
            assert result.results["x"] == n + 1
        assert proc.returncode is None
        # Once the output is read again, one line says how many lines the stall cost.
        seen = b""
        async with asyncio.timeout(60):
            while b"log line(s) dropped" not in seen:
                seen += await proc.stdout.read(1 << 16)
    finally:
        text = await _stop(proc)
    text = seen.decode() + text
    assert proc.returncode == 0, text[-2000:]
    dropped = [int(m) for m in re.findall(r"(\d+) log line\(s\) dropped", text)]
    published = text.count("ignored a publish")
    assert dropped and published + sum(dropped) == 20_000
    assert text.splitlines()[-1].endswith(" stopped"), text[-500:]    # the last line survives a clean exit


async def test_a_flood_of_bad_frames_is_rate_limited_with_a_count(tmp_path, server):
    proc = await _spawn(tmp_path, server)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        for _ in range(5_000):
            await server.send_frame(SOURCE, {"op": "noSuchOp"})
        assert (await server.query({"code": "x = 2"}, timeout=60)).results["x"] == 2
    finally:
        text = await _stop(proc)
    assert proc.returncode == 0, text[-2000:]
    lines = [line for line in text.splitlines() if "unknown op 'noSuchOp'" in line]
    summaries = [line for line in lines if "more like this were not logged" in line]
    held = sum(int(re.search(r"(\d+) more like this", line).group(1)) for line in summaries)
    assert summaries and len(lines) <= 40, len(lines)
    assert len(lines) - len(summaries) + held == 5_000
    assert any(line.endswith(" stopped") for line in text.splitlines()[-2:])


def test_rate_limit_filter_passes_the_first_then_counts_per_window():
    now = [0.0]
    logger = logging.getLogger("test_logging_flow.limited")
    logger.propagate = False
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger.handlers[:] = [Collect()]
    limiter = RateLimitFilter(first=3, window=10.0, clock=lambda: now[0])
    logger.addFilter(limiter)
    try:
        for i in range(100):
            logger.warning("bad frame %d", i, extra={"rate_key": "bad"})
        logger.warning("other kind", extra={"rate_key": "other"})
        logger.warning("no key at all")
        assert seen == ["bad frame 0", "bad frame 1", "bad frame 2", "other kind", "no key at all"]
        now[0] = 11.0
        logger.warning("bad frame again", extra={"rate_key": "bad"})
        assert seen[-2].startswith("97 more like this were not logged in the last 11.0 s; the last: bad frame 99")
        assert seen[-1] == "bad frame again"
        logger.warning("bad frame again", extra={"rate_key": "bad"})
        logger.warning("bad frame again", extra={"rate_key": "bad"})
        logger.warning("bad frame again", extra={"rate_key": "bad"})
        limiter.flush(force=True)
        assert seen[-1].startswith("1 more like this")
        assert limiter.held_total == 98
    finally:
        logger.removeFilter(limiter)
        logger.handlers.clear()


async def test_logger_ini_handlers_work_behind_the_log_pump(tmp_path, server):
    """logger.ini still configures logging: its root handler and a named logger's own file handler both
    get their lines (through the pump), and everything is written by the time the command exits."""
    (tmp_path / "serverConfig").mkdir()
    link_log = tmp_path / "link.log"
    (tmp_path / "serverConfig" / "logger.ini").write_text(
        "[loggers]\nkeys=root,link\n[handlers]\nkeys=out,file\n[formatters]\nkeys=f\n"
        "[logger_root]\nlevel=INFO\nhandlers=out\n"
        "[logger_link]\nlevel=INFO\nhandlers=file\npropagate=0\nqualname=pyexec_connector.link\n"
        "[handler_out]\nclass=StreamHandler\nlevel=INFO\nformatter=f\nargs=(sys.stdout,)\n"
        f"[handler_file]\nclass=FileHandler\nlevel=INFO\nformatter=f\nargs=({str(link_log)!r},)\n"
        "[formatter_f]\nformat=INI|%(name)s|%(message)s\n")
    proc = await _spawn(tmp_path, server)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        for _ in range(30):
            await server.send_frame(SOURCE, {"op": "noSuchOp"})
        assert (await server.query({"code": "x = 3"}, timeout=60)).results["x"] == 3
    finally:
        text = await _stop(proc)
    assert proc.returncode == 0, text
    assert "INI|pyexec_connector|stopped" in text.splitlines()
    assert "pyexec_connector.link" not in text
    lines = link_log.read_text().splitlines()
    assert "INI|pyexec_connector.link|source pythonSource: connected and configured" in lines
    assert sum("unknown op" in line for line in lines) == 11     # 10 in full, then one with the count
    assert "20 more like this were not logged" in lines[-1]


async def test_a_stopped_connector_exits_even_when_nobody_ever_reads_its_output(tmp_path, server):
    proc = await _spawn(tmp_path, server)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        for _ in range(5_000):       # far more than the pipe holds: the log pump is stuck writing
            await server.send_frame(SOURCE, {"op": "publish", "object": {"n": 1}})
        assert (await server.query({"code": "x = 4"}, timeout=60)).results["x"] == 4
        proc.terminate()
        # bounded: the pump gets a few seconds to write what it holds, then the process exits anyway.
        # (Not proc.wait(): asyncio's wait() also waits for the pipe's end of file, which needs a reader.)
        async with asyncio.timeout(60):
            while proc.returncode is None:
                await asyncio.sleep(0.1)
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()

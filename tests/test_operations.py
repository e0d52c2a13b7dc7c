"""Operations through the real console command: HTTP endpoints, metrics, graceful shutdown, environment-only
configuration, `check` and JSON logs, against the stand-in server on loopback."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from pyexec_connector import errors
from pyexec_connector.devserver import DevServer

from .conftest import SOURCE, TOKEN, console_command, free_port

STARTED = "import asyncio\nawait connector_connection.send_notification({'started': True})\n"
SLEEPY = STARTED + "await asyncio.sleep(1)\nslept = True"


def sleeping(seconds: float, result: str = "done = 1") -> str:
    """Code that says it started (a notification), then sleeps with top-level await."""
    return STARTED + f"await asyncio.sleep({seconds})\n{result}"


class Proc:
    """The console command in a subprocess; its output is collected as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    async def wait_for_line(self, text: str, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not any(text in line for line in self.lines):
                await asyncio.sleep(0.02)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 60) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, timeout)
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 10)


@pytest.fixture
async def spawn(tmp_path):
    procs: list[Proc] = []

    async def start(*args: str, config: str | None = None, env: dict[str, str] | None = None,
                    clean_env: bool = False) -> Proc:
        if config is not None:
            (tmp_path / "serverConfig").mkdir(exist_ok=True)
            (tmp_path / "serverConfig" / "server.config").write_text(config)
        base = {"PATH": os.environ.get("PATH", "")} if clean_env else {
            k: v for k, v in os.environ.items() if not k.startswith("CONNECTOR_")}
        process = await asyncio.create_subprocess_exec(
            *console_command(), *args, cwd=tmp_path, env={**base, **(env or {})},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        proc = Proc(process)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        await proc.kill()


def config_text(server: DevServer, token: str = TOKEN, sources: str = SOURCE, **extra: object) -> str:
    lines = [f"targetServer = {server.url}", f"authToken = {token}", f"sources = {sources}"]
    lines += [f"{key} = {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


async def wait_for_status(port: int, path: str, status: int, timeout: float = 30.0) -> str:
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                got, body = await get(port, path)
                if got == status:
                    return body
            await asyncio.sleep(0.1)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


# ---- HTTP endpoints and metrics ------------------------------------------------------------------

async def test_endpoints_follow_the_server_going_away_and_coming_back(server, spawn):
    port = free_port()
    proc = await spawn(config=config_text(server, metricsPort=port))
    await server.wait_attached(SOURCE, timeout=30)
    await wait_for_status(port, "/readyz", 200)
    assert (await get(port, "/healthz"))[0] == 200

    server_port = server.port
    await server.stop()                          # the stand-in goes away
    body = json.loads(await wait_for_status(port, "/readyz", 503))
    assert body["status"] == "not ready" and SOURCE in body["notReady"]
    assert (await get(port, "/healthz"))[0] == 200      # alive, just not connected
    metrics = samples((await get(port, "/metrics"))[1])
    assert value(metrics, "pyexec_source_connected", source=SOURCE) == 0

    await server.start(port=server_port)         # ... and comes back on the same address
    await server.wait_attached(SOURCE, timeout=30)
    await wait_for_status(port, "/readyz", 200)
    metrics = samples((await get(port, "/metrics"))[1])
    assert value(metrics, "pyexec_source_connected", source=SOURCE) == 1
    assert value(metrics, "pyexec_link_reconnects_total", source=SOURCE) >= 1
    proc.signal()
    assert await proc.wait() == 0, proc.output


async def test_metric_values_move_after_known_queries(server, spawn):
    port = free_port()
    server.put_document("double.py", "doubled = n * 2")
    proc = await spawn(config=config_text(server, metricsPort=port))
    await server.wait_attached(SOURCE, timeout=30)
    before = samples((await get(port, "/metrics"))[1])
    assert value(before, "pyexec_queries_total", source=SOURCE, outcome="ok") == 0

    for _ in range(3):
        assert (await server.query({"code": "y = 1", "name": "one"})).status == 200
    assert (await server.query({"script": "double.py", "presetValues": {"n": 2}})).results["doubled"] == 4
    assert (await server.query({"code": "1/0"})).error_code == errors.EXECUTION_EXCEPTION
    assert (await server.query({"code": "x = "})).error_code == errors.SYNTAX_ERROR

    text = (await get(port, "/metrics"))[1]
    after = samples(text)
    assert value(after, "pyexec_queries_total", source=SOURCE, outcome="ok") == 4
    assert value(after, "pyexec_queries_total", source=SOURCE, outcome="error") == 2
    assert value(after, "pyexec_query_errors_total", source=SOURCE, message_code=errors.EXECUTION_EXCEPTION) == 1
    assert value(after, "pyexec_query_errors_total", source=SOURCE, message_code=errors.SYNTAX_ERROR) == 1
    assert value(after, "pyexec_query_duration_seconds_count", source=SOURCE) == 6
    assert value(after, "pyexec_code_cache_hits_total", source=SOURCE) >= 2      # "one" compiled once
    assert value(after, "pyexec_code_cache_misses_total", source=SOURCE) >= 1
    assert value(after, "pyexec_code_cache_size", source=SOURCE) >= 2
    assert value(after, "pyexec_document_fetches_total", source=SOURCE) == 1
    assert value(after, "pyexec_source_connected", source=SOURCE) == 1
    assert "# TYPE pyexec_query_duration_seconds histogram" in text
    proc.signal()
    assert await proc.wait() == 0, proc.output


async def test_a_busy_metrics_port_is_a_configuration_error(server, spawn):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = await spawn(config=config_text(server, metricsPort=port))
        assert await proc.wait() == 2, proc.output
    assert "metricsPort" in proc.output and f"cannot listen on port {port}" in proc.output


# ---- graceful shutdown ---------------------------------------------------------------------------

async def test_sigterm_answers_the_query_in_flight_and_exits_0(server, spawn):
    proc = await spawn(config=config_text(server))
    await server.wait_attached(SOURCE, timeout=30)
    address = await server.send_query(SOURCE, {"code": SLEEPY})
    await server.wait_notifications(SOURCE, 1, timeout=30)        # the query is running
    proc.signal(signal.SIGTERM)
    result = await server.replies_for(address, timeout=30)
    assert result.status == 200 and result.results["slept"] is True
    assert await proc.wait() == 0, proc.output
    async with asyncio.timeout(10):
        while not server.close_codes:
            await asyncio.sleep(0.01)
    assert server.close_codes[-1] == 1000      # a normal close


async def test_new_queries_during_shutdown_get_shutting_down(server, spawn):
    proc = await spawn(config=config_text(server, shutdownGraceSeconds=20))
    await server.wait_attached(SOURCE, timeout=30)
    slow = await server.send_query(SOURCE, {"code": sleeping(1.5)})
    await server.wait_notifications(SOURCE, 1, timeout=30)
    proc.signal(signal.SIGINT)
    await proc.wait_for_line("SIGINT received")
    late = [await server.send_query(SOURCE, {"code": "x = 1"}) for _ in range(3)]
    for address in late:
        result = await server.replies_for(address, timeout=10)
        assert result.status == 400 and result.error_code == errors.SHUTTING_DOWN
    assert (await server.replies_for(slow, timeout=30)).results["done"] == 1
    assert await proc.wait() == 0, proc.output


async def test_queries_still_running_when_the_grace_ends_are_answered_with_an_error(server, spawn):
    proc = await spawn(config=config_text(server, shutdownGraceSeconds=1))
    await server.wait_attached(SOURCE, timeout=30)
    address = await server.send_query(SOURCE, {"code": sleeping(120)})
    await server.wait_notifications(SOURCE, 1, timeout=30)
    proc.signal()
    result = await server.replies_for(address, timeout=30)
    assert result.status == 400 and result.error_code == errors.SHUTTING_DOWN
    assert await proc.wait() == 0, proc.output
    assert "grace (1 s) over" in proc.output


async def test_a_second_signal_exits_at_once(server, spawn):
    proc = await spawn(config=config_text(server, shutdownGraceSeconds=120))
    await server.wait_attached(SOURCE, timeout=30)
    await server.send_query(SOURCE, {"code": sleeping(120)})
    await server.wait_notifications(SOURCE, 1, timeout=30)
    proc.signal()
    await proc.wait_for_line("SIGTERM received")
    await asyncio.sleep(0.3)
    assert proc.proc.returncode is None          # still draining
    proc.signal()
    assert await proc.wait(timeout=20) == 1
    assert "received again" in proc.output


# ---- configuration from the environment ----------------------------------------------------------

async def test_runs_from_the_environment_alone(server, spawn, tmp_path):
    port = free_port()
    proc = await spawn(clean_env=True, env={
        "CONNECTOR_TARGET_SERVER": server.url, "CONNECTOR_AUTH_TOKEN": TOKEN, "CONNECTOR_SOURCES": SOURCE,
        "CONNECTOR_SEND_PINGS": "true", "CONNECTOR_METRICS_PORT": str(port)})
    assert not (tmp_path / "serverConfig").exists()
    await server.wait_attached(SOURCE, timeout=30)
    assert (await server.query({"code": "x = 2 + 2"})).results["x"] == 4
    await wait_for_status(port, "/readyz", 200)
    proc.signal()
    assert await proc.wait() == 0, proc.output
    assert TOKEN not in proc.output


async def test_a_bad_environment_value_names_the_key_and_the_variable(server, spawn):
    proc = await spawn(clean_env=True, env={
        "CONNECTOR_TARGET_SERVER": server.url, "CONNECTOR_AUTH_TOKEN": TOKEN, "CONNECTOR_SOURCES": SOURCE,
        "CONNECTOR_SEND_PINGS": "maybe"})
    assert await proc.wait() == 2
    assert "environment variable CONNECTOR_SEND_PINGS" in proc.output and "sendPings" in proc.output


# ---- check ---------------------------------------------------------------------------------------

async def test_check_passes_against_a_good_server(server, spawn):
    proc = await spawn("check", config=config_text(server))
    assert await proc.wait() == 0, proc.output
    assert f"source {SOURCE}  connected" in proc.output
    assert TOKEN not in proc.output


async def test_check_reports_a_bad_token(server, spawn):
    proc = await spawn("check", config=config_text(server, token="wrong-token"))
    assert await proc.wait() == 3, proc.output
    assert "bad token" in proc.output and "wrong-token" not in proc.output


async def test_check_reports_an_unknown_source_per_line(server, spawn):
    server.refuse("missingSource")
    proc = await spawn("check", config=config_text(server, sources=f"{SOURCE}, missingSource"))
    assert await proc.wait() == 1, proc.output
    lines = [line for line in proc.lines if line.startswith("source ")]
    assert len(lines) == 2
    assert "connected" in lines[0]
    assert "missingSource" in lines[1] and "source unknown" in lines[1] and "404" in lines[1]


async def test_check_imports_the_preload_list_and_names_a_module_that_fails(server, spawn):
    server.set_source_config(SOURCE, {"preload": ["json", "no_such_module_for_check"]})
    proc = await spawn("check", config=config_text(server))
    assert await proc.wait() == 1, proc.output
    line = next(line for line in proc.lines if line.startswith(f"source {SOURCE}"))
    assert "preload failed" in line and "'no_such_module_for_check'" in line and "ModuleNotFoundError" in line
    server.set_source_config(SOURCE, {"preload": ["json"]})
    proc = await spawn("check", config=config_text(server))
    assert await proc.wait() == 0, proc.output
    assert f"source {SOURCE}  connected" in proc.output and "preload imported: json" in proc.output


async def test_check_reports_a_bad_source_configuration_by_key(server, spawn):
    server.set_source_config(SOURCE, {"workers": "many", "noSuchKey": 1})
    proc = await spawn("check", config=config_text(server))
    assert await proc.wait() == 1, proc.output
    line = next(line for line in proc.lines if line.startswith(f"source {SOURCE}"))
    assert "bad configuration" in line and "pythonExecConfig.general.workers" in line
    assert "pythonExecConfig.general.noSuchKey" in line


async def test_check_reports_an_unreachable_host(spawn):
    port = free_port()
    proc = await spawn("check", config=f"targetServer = http://127.0.0.1:{port}\nauthToken = t\nsources = a\n")
    assert await proc.wait() == 1, proc.output
    assert "source a  host unreachable" in proc.output


async def test_check_reports_a_server_that_never_answers(server, spawn):
    server.silent_validate = True
    proc = await spawn("check", "--timeout", "1", config=config_text(server))
    assert await proc.wait() == 1, proc.output
    assert f"source {SOURCE}  host unreachable" in proc.output and "no answer within 1 s" in proc.output


async def test_check_reports_a_tls_failure(spawn):
    ca = trustme.CA()                            # a CA the client does not trust
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    try:
        proc = await spawn("check", config=f"targetServer = https://127.0.0.1:{port}\nauthToken = t\nsources = a\n")
        assert await proc.wait() == 1, proc.output
    finally:
        listener.close()
    assert "source a  TLS failure" in proc.output


async def test_check_reports_every_configuration_problem_with_its_key(spawn):
    proc = await spawn("check", config="targetServer = ftp://nowhere\nauthToken = t\nsources = a\n"
                                       "sendPings = perhaps\ntcpProbePort = 99999\n")
    assert await proc.wait() == 2, proc.output
    problems = [line for line in proc.lines if line.startswith("configuration:")]
    assert len(problems) == 3
    for key in ("targetServer", "sendPings", "tcpProbePort"):
        assert any(f"key '{key}'" in line for line in problems), proc.output


# ---- JSON logs -----------------------------------------------------------------------------------

async def test_json_log_lines_parse_back(server, spawn):
    proc = await spawn("--log-format", "json", "--log-level", "DEBUG", config=config_text(server))
    await server.wait_attached(SOURCE, timeout=30)
    ok = await server.send_query(SOURCE, {"code": "x = 1"})
    assert (await server.replies_for(ok)).status == 200
    bad = await server.send_query(SOURCE, {"code": "1/0"})
    assert (await server.replies_for(bad)).status == 400
    await asyncio.sleep(0.3)
    proc.signal()
    assert await proc.wait() == 0, proc.output
    entries = [json.loads(line) for line in proc.lines if line.strip()]     # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    by_address = {e["replyAddress"]: e for e in entries if "replyAddress" in e}
    assert by_address[ok]["outcome"] == "ok" and by_address[ok]["source"] == SOURCE
    assert by_address[ok]["level"] == "DEBUG" and by_address[ok]["duration"] >= 0
    assert by_address[bad]["outcome"] == "error" and by_address[bad]["level"] == "INFO"
    assert by_address[bad]["messageCode"] == errors.EXECUTION_EXCEPTION
    assert TOKEN not in proc.output


async def test_logger_ini_wins_over_log_format(server, spawn, tmp_path):
    (tmp_path / "serverConfig").mkdir()
    (tmp_path / "serverConfig" / "logger.ini").write_text(
        "[loggers]\nkeys=root\n[handlers]\nkeys=h\n[formatters]\nkeys=f\n"
        "[logger_root]\nlevel=INFO\nhandlers=h\n"
        "[handler_h]\nclass=StreamHandler\nlevel=INFO\nformatter=f\nargs=(sys.stdout,)\n"
        "[formatter_f]\nformat=INI|%(levelname)s|%(message)s\n")
    proc = await spawn("--log-format", "json", config=config_text(server))
    await server.wait_attached(SOURCE, timeout=30)
    proc.signal()
    assert await proc.wait() == 0, proc.output
    assert proc.lines and all(line.startswith("INI|") for line in proc.lines if line.strip())


def test_help_names_the_operations_commands_and_options():
    import subprocess
    done = subprocess.run(console_command() + ["--help"], capture_output=True, text=True, timeout=60)
    for word in ("check", "doctor", "healthcheck", "--log-format"):
        assert word in done.stdout
    doctor = subprocess.run(console_command() + ["doctor", "--help"], capture_output=True, text=True, timeout=60)
    assert doctor.returncode == 0 and "connectExtension" in doctor.stdout

"""Health, readiness, metrics and the TCP probe on real connectors in this process; refusal logging."""
from __future__ import annotations

import ast
import asyncio
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pyexec_connector
from pyexec_connector.config import build_server_config
from pyexec_connector.connector import Connector
from pyexec_connector.engine import EngineStats, Outcome
from pyexec_connector.engine.pipeline import Pipeline
from pyexec_connector.errors import QueryError
from pyexec_connector.querylog import QueryLog
from pyexec_connector.reply import ReplyChannel

from .conftest import SOURCE, TOKEN, free_port


def scrape(connector: Connector) -> dict[tuple[str, frozenset], float]:
    text = connector.metrics.exposition().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def can_connect(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def test_two_connectors_in_one_process_keep_their_own_metrics(server, start_connector):
    first = await start_connector()
    second = await start_connector(sources="second")
    assert first.connector.metrics.registry is not second.connector.metrics.registry
    assert (await server.query({"code": "x = 1"})).status == 200
    assert (await server.query({"code": "x = 1"}, source="second")).status == 200
    assert (await server.query({"code": "x = 2"}, source="second")).status == 200
    one, two = scrape(first.connector), scrape(second.connector)
    assert one[("pyexec_queries_total", frozenset({("source", SOURCE), ("outcome", "ok")}))] == 1
    assert two[("pyexec_queries_total", frozenset({("source", "second"), ("outcome", "ok")}))] == 2
    assert not any(dict(labels).get("source") == "second" for _, labels in one)


async def test_engine_figures_come_from_engine_stats(server, start_connector):
    server.set_source_config(SOURCE, {"executionMode": "inline"})
    running = await start_connector()
    names = {name for name, _ in scrape(running.connector)}
    assert "pyexec_engine_workers_alive" not in names          # the inline engine has no workers
    assert "pyexec_engine_worker_recycles_total" not in names
    figures = EngineStats(workers_alive=2, worker_restarts=1, timeouts=3, queue_depth=0, cache_hits=7,
                          worker_recycles={"memory": 4})
    running.session.engine.stats = lambda: figures             # what the process engine provides
    metrics = scrape(running.connector)
    label = frozenset({("source", SOURCE)})
    assert metrics[("pyexec_engine_workers_alive", label)] == 2
    assert metrics[("pyexec_engine_worker_restarts_total", label)] == 1
    assert metrics[("pyexec_engine_timeouts_total", label)] == 3
    assert metrics[("pyexec_engine_queue_depth", label)] == 0
    assert metrics[("pyexec_code_cache_hits_total", label)] == 7
    assert metrics[("pyexec_engine_worker_recycles_total", label | {("reason", "memory")})] == 4
    assert metrics[("pyexec_engine_worker_recycles_total", label | {("reason", "queries")})] == 0
    assert running.connector.health_problems() == []
    figures = replace(figures, workers_alive=0, can_run=False)
    assert "no engine worker alive" in running.connector.health_problems()[0]


async def test_queries_in_flight_counts_relayed_queries_and_a_graceful_finish_waits_for_them(
        server, start_connector):
    """A relayed query (process mode) has no task of its own: the gauge and the session's finish count the
    queries not answered yet."""
    server.set_source_config(SOURCE, {"executionMode": "process", "workers": 1})
    running = await start_connector()
    assert (await server.query({"code": "warm = 1"}, timeout=60)).status == 200
    label = frozenset({("source", SOURCE)})
    address = await server.send_query(SOURCE, {"code": "import time\ntime.sleep(0.5)\nslept = True"})
    async with asyncio.timeout(10):
        while scrape(running.connector)[("pyexec_queries_in_flight", label)] != 1:
            await asyncio.sleep(0.01)
    assert running.session.running == 1 and not running.session.in_flight     # no task: it was relayed
    assert await running.session.finish(10) == 0
    assert (await server.replies_for(address, 10)).results == {"slept": True}
    assert scrape(running.connector)[("pyexec_queries_in_flight", label)] == 0


async def test_metrics_modules_import_downwards_only():
    """health loads exposition on the first scrape; exposition, and the figures both read, never import
    health back (issue 20: no import circle, the engine reached only through Engine.stats())."""
    package = Path(pyexec_connector.__file__).parent
    graph = {}
    for module in ("health", "exposition", "figures", "engine/stats"):
        tree = ast.parse((package / f"{module}.py").read_text())
        graph[module] = {node.module.lstrip(".").replace(".", "/") for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module and node.level}
        graph[module] |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                          and node.level and not node.module for alias in node.names}
    assert "exposition" in graph["health"] and "figures" in graph["exposition"]
    assert "health" not in graph["exposition"] | graph["figures"] | graph["engine/stats"]
    assert "exposition" not in graph["figures"] | graph["engine/stats"]
    source = (package / "health.py").read_text() + (package / "exposition.py").read_text()
    assert "getattr(" not in source


async def test_healthz_follows_declared_health_and_readyz_names_sources(server, start_connector):
    port = free_port()
    running = await start_connector(sources=f"{SOURCE}, other", metricsPort=port)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200
        server.refuse("other", 409, "io.vantiq.source.already.served", "Someone else serves {0}.")
        await server.drop("other")
        for _ in range(200):
            async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                if response.status == 503:
                    body = await response.json()
                    break
            await asyncio.sleep(0.02)
        assert list(body["notReady"]) == ["other"]
        assert (await server.query({"code": "await connector_connection.declare_unhealthy()"})).status == 200
        async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 503
            assert "declared unhealthy" in (await response.json())["problems"][0]
        await running.stop()
        with pytest.raises(aiohttp.ClientError):          # the endpoints close with the connector
            await http.get(f"http://127.0.0.1:{port}/healthz")


async def test_tcp_probe_under_kubernetes_and_declared_health(server, start_connector, monkeypatch):
    port = free_port()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    running = await start_connector(tcpProbePort=port)
    assert await can_connect(port)
    assert (await server.query({"code": "h = connector_connection.is_healthy()"})).results["h"] is True
    assert (await server.query({"code": "await connector_connection.declare_unhealthy()"})).status == 200
    assert not await can_connect(port)
    assert (await server.query({"code": "await connector_connection.declare_healthy()"})).status == 200
    assert await can_connect(port)
    await running.stop()
    assert not await can_connect(port)


async def test_tcp_probe_waits_for_declare_healthy_outside_kubernetes(server, start_connector, monkeypatch):
    port = free_port()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    running = await start_connector(tcpProbePort=port)
    assert not await can_connect(port)
    assert (await server.query({"code": "await connector_connection.declare_healthy()"})).status == 200
    assert await can_connect(port)
    await running.stop()


async def test_refusals_warn_once_per_state_change(server, start_connector, caplog):
    caplog.set_level(logging.DEBUG, logger="pyexec_connector.link")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                and "refused the connection" in r.getMessage()]

    async def attempts(count: int) -> None:
        start = server.connects(SOURCE)
        async with asyncio.timeout(10):
            while server.connects(SOURCE) < start + count:
                await asyncio.sleep(0.02)

    server.refuse(SOURCE, 404, "io.vantiq.resource.not.found", "The source {0} does not exist.")
    running = await start_connector(wait=False)
    await attempts(4)
    assert len(warnings()) == 1 and "does not exist" in warnings()[0]
    server.refuse(SOURCE, 409, "io.vantiq.source.already.served", "Another connector serves {0}.")
    await attempts(4)
    assert len(warnings()) == 2 and "Another connector" in warnings()[1]     # a new state: one more
    server.accept(SOURCE)
    await running.connector.wait_ready(timeout=10)
    server.refuse(SOURCE, 409, "io.vantiq.source.already.served", "Another connector serves {0}.")
    await server.drop(SOURCE)
    await attempts(4)
    assert len(warnings()) == 3          # the same refusal again after being connected: a state change


async def test_shutdown_refuses_new_queries_and_closes_normally(server, start_connector):
    running = await start_connector(shutdownGraceSeconds=20)
    code = "import asyncio\nawait connector_connection.send_notification(1)\nawait asyncio.sleep(0.5)\nz = 1"
    slow = await server.send_query(SOURCE, {"code": code})
    await server.wait_notifications(SOURCE, 1)           # running
    running.connector.stop()
    async with asyncio.timeout(10):
        while not running.connector.shutting_down:
            await asyncio.sleep(0.01)
    assert not running.connector.ready and running.connector.not_ready() == {SOURCE: "shutting down"}
    late = await server.query({"code": "x = 1"})
    assert late.error_code == "io.vantiq.pyexecsource.shuttingdown"
    assert (await server.replies_for(slow)).results["z"] == 1
    await asyncio.wait_for(running.task, 10)
    async with asyncio.timeout(10):
        while not server.close_codes:
            await asyncio.sleep(0.01)
    assert server.close_codes[-1] == 1000


def test_metrics_port_is_off_unless_configured():
    config = build_server_config({"targetServer": "http://127.0.0.1:1", "authToken": TOKEN, "sources": "s"}, env={})
    assert config.metrics_port is None and Connector(config).http is None
    config = build_server_config({"targetServer": "http://127.0.0.1:1", "authToken": TOKEN, "sources": "s",
                                  "metricsPort": "9090", "shutdownGraceSeconds": "5"}, env={})
    assert config.metrics_port == 9090 and config.shutdown_grace_seconds == 5


async def test_cache_counters_survive_a_reconfigure(connected):
    server, running = connected
    for _ in range(3):
        assert (await server.query({"code": "x = 1", "name": "same"})).status == 200
    label = frozenset({("source", SOURCE)})
    before = scrape(running.connector)[("pyexec_code_cache_hits_total", label)]
    assert before >= 2
    await server.reconfigure(SOURCE, {"codeCacheSize": 8})
    assert (await server.query({"code": "x = 1"})).status == 200       # after the configure arrived
    metrics = scrape(running.connector)
    assert metrics[("pyexec_code_cache_hits_total", label)] >= before
    assert metrics[("pyexec_code_cache_capacity", label)] == 8


def test_prometheus_client_is_loaded_on_the_first_scrape_not_at_start():
    # issue 11 (h): a connector nobody scrapes does not carry prometheus_client (~2 MiB of its memory)
    script = (
        "import sys\n"
        "from pyexec_connector import cli\n"
        "from pyexec_connector.config import build_server_config\n"
        "from pyexec_connector.connector import Connector\n"
        "config = build_server_config({'targetServer': 'http://127.0.0.1:1', 'authToken': 't', 'sources': 's'},"
        " env={})\n"
        "connector = Connector(config)\n"
        "print(sorted(m for m in ('prometheus_client', 'aiohttp') if m in sys.modules))\n"
        "text = connector.metrics.exposition().decode()\n"
        "print('prometheus_client' in sys.modules, 'pyexec_log_lines_dropped' in text or 'pyexec_' in text)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "True True"], done.stdout


def test_a_pipeline_ends_each_query_into_its_query_log_and_calls_nothing_back():
    """Pipeline.finish writes every end into the QueryLog it was given (a sink below it, no callback):
    the count, the figures /metrics exports; a second finish for the same query counts nothing."""
    queries = QueryLog("s")
    pipeline = Pipeline("s", None, queries)
    sent: list[str] = []
    failed, answered = ReplyChannel(sent.append, "a1", "s"), ReplyChannel(sent.append, "a2", "s")
    for channel in (failed, answered):
        pipeline.begin(channel)
    pipeline.finish(failed, error=QueryError("my.code", "bad {0}", [1]))
    pipeline.finish(failed, error=QueryError("my.other", "again"))         # ended already: nothing
    pipeline.finish(answered, Outcome(results_json='{"x":1}'))
    assert len(sent) == 2 and queries.answered == 2
    figures = queries.figures
    assert (figures.ok, figures.error, figures.errors) == (1, 1, {"my.code": 1})
    assert sum(figures.buckets) == 2 and figures.total_seconds >= 0

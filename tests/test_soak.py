"""Soak: many queries of every kind with faults injected every few hundred. Zero queries without their
terminal reply, zero lost or duplicated notifications, bounded memory.

The short run is part of the normal suite; the long one (20,000 queries) runs with
    pytest -m slow tests/test_soak.py -s
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from dataclasses import dataclass, field

import pytest

from pyexec_connector import errors

from .conftest import SOURCE

STREAM = ("import asyncio\n"
          "async def go():\n"
          "    await connector_connection.send_query_response(connector_context, 100, {'i': i, 'part': 0})\n"
          "    await connector_connection.send_notification({'q': i})\n"
          "    await connector_connection.send_query_response(connector_context, 200, {'i': i, 'part': 1})\n"
          "asyncio.get_event_loop().create_task(go())")


def rss_bytes() -> int:
    """Resident memory of this process and its children (the process engine's workers)."""
    pids = ["self"]
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as fp:
            pids += fp.read().split()
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/statm") as fp:
            total += int(fp.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


@dataclass
class SoakReport:
    queries: int = 0
    answered: int = 0
    lost: int = 0
    wrong: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    notifications: int = 0
    reconnects: int = 0
    rss_after_first_block: int = 0
    rss_at_end: int = 0

    @property
    def faults_injected(self) -> int:
        return sum(self.faults.values())

    @property
    def rss_growth(self) -> float:
        return (self.rss_at_end - self.rss_after_first_block) / self.rss_after_first_block

    def __str__(self) -> str:
        return (f"queries sent {self.queries}, answered {self.answered}, lost {self.lost}, wrong {len(self.wrong)}, "
                f"notifications {self.notifications}, faults injected {self.faults_injected} {self.faults}, "
                f"new sockets {self.reconnects}, "
                f"RSS after the first block {self.rss_after_first_block / 2**20:.1f} MiB, at the end "
                f"{self.rss_at_end / 2**20:.1f} MiB, growth {self.rss_growth:+.1%}")


def params_for(i: int) -> dict:
    kind = i % 4
    if kind == 0:
        return {"code": "y = x * 2", "presetValues": {"x": i}}
    if kind == 1:
        return {"code": STREAM, "codeHandlesReturn": True, "presetValues": {"i": i}}
    if kind == 2:
        return {"code": "z = x + 1", "name": "soak-plus", "presetValues": {"x": i}}
    return {"code": "raise ValueError(x)", "presetValues": {"x": i}}


def check(i: int, result) -> str | None:
    kind = i % 4
    statuses = [r["status"] for r in result.replies]
    if kind == 0 and statuses == [200] and result.results == {"x": i, "y": 2 * i}:
        return None
    if kind == 1 and statuses == [100, 200] and [r["body"] for r in result.replies] == [
            {"i": i, "part": 0}, {"i": i, "part": 1}]:
        return None
    if kind == 2 and statuses == [200] and result.results == {"x": i, "z": i + 1}:
        return None
    if kind == 3 and statuses == [400] and result.error_code == errors.EXECUTION_EXCEPTION \
            and f"ValueError: {i}" in result.body["parameters"][1]:
        return None
    return f"query {i}: {result.replies}"


FAULTS = ("drop", "reconnectRequired", "storm", "drop+handshake-cut")


async def inject(server, n: int, report: SoakReport) -> None:
    kind = FAULTS[n % len(FAULTS)]
    await server.wait_attached(SOURCE, timeout=30)     # every fault hits a live session, none is a no-op
    report.faults[kind] = report.faults.get(kind, 0) + 1
    if kind == "drop":
        await server.drop(SOURCE)
    elif kind == "reconnectRequired":
        await server.request_reconnect(SOURCE)
    elif kind == "storm":
        for _ in range(10):
            await server.request_reconnect(SOURCE)
    else:
        server.close_during_handshake("validate", 1)
        await server.drop(SOURCE)


async def soak(server, running, total: int, fault_every: int, block: int = 1000, window: int = 50) -> SoakReport:
    report = SoakReport()
    gate = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with gate:
            try:
                result = await server.query(params_for(i), timeout=60)
            except TimeoutError:
                report.lost += 1
                return
        report.answered += 1
        problem = check(i, result)
        if problem:
            report.wrong.append(problem)

    faults = 0
    for start in range(0, total, block):
        tasks = []
        for i in range(start, min(total, start + block)):
            if i and i % fault_every == 0:
                await inject(server, faults, report)
                faults += 1
            await gate.acquire()          # keep `window` queries in flight, no more
            gate.release()
            tasks.append(asyncio.create_task(one(i)))
            report.queries += 1
        await asyncio.gather(*tasks)
        # every notification of this block, once each; then forget them (the stand-in's memory is not ours)
        expected = sorted(i for i in range(start, min(total, start + block)) if i % 4 == 1)
        await server.wait_notifications(SOURCE, len(expected), timeout=60)
        await asyncio.sleep(0.05)
        got = sorted(note["q"] for note in server.notifications[SOURCE])
        if got != expected:
            report.wrong.append(f"notifications of block {start}: {len(got)} for {len(expected)} expected")
        report.notifications += len(got)
        server.notifications[SOURCE].clear()
        gc.collect()
        if start == 0:
            report.rss_after_first_block = rss_bytes()
    report.rss_at_end = rss_bytes()
    report.reconnects = running.session.link.reconnects
    assert running.session.in_flight == set() or await _settled(running)
    return report


async def _settled(running) -> bool:
    for _ in range(100):
        if not running.session.in_flight:
            return True
        await asyncio.sleep(0.02)
    return False


def assert_clean(report: SoakReport, server) -> None:
    assert report.lost == 0, report
    assert report.wrong == [], report.wrong[:5]
    assert report.answered == report.queries
    assert server.stray_replies == [], "duplicated or unexpected replies"
    assert server.bad_frames == 0
    # every drop cost one new socket, every drop with a handshake cut two; reconnectRequired none
    assert report.reconnects == report.faults.get("drop", 0) + 2 * report.faults.get("drop+handshake-cut", 0)


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_soak_short(server, start_connector, capsys, mode):
    server.set_source_config(SOURCE, {"executionMode": mode})
    running = await start_connector()
    report = await soak(server, running, total=1000, fault_every=100, block=250)
    with capsys.disabled():
        print(f"\nsoak (short, {mode} engine): {report}")
    assert_clean(report, server)
    assert report.faults_injected == 9


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_soak_long(server, start_connector, capsys, mode):
    server.set_source_config(SOURCE, {"executionMode": mode})
    running = await start_connector()
    report = await soak(server, running, total=20_000, fault_every=300)
    with capsys.disabled():
        print(f"\nsoak (long, {mode} engine): {report}")
    assert_clean(report, server)
    assert report.rss_growth < 0.10, report

"""The benchmark suite: the real connector process (and the baselines) against devserver.py over loopback.

    python -m bench [--peer CMD] [--size tiny|full] [--out DIR] [--update-docs]

Every cell (scenario x concurrency) starts each target fresh, warms it up, then measures the targets
alternately (ours per engine mode, the floor, the upstream peer, ours again, ...) for `rounds` rounds,
so that drift of a shared machine hits all of them alike. Figures are reported as ratios to the floor
and to upstream."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from pyexec_connector.config import SourceConfig
from pyexec_connector.devserver import DevServer
from pyexec_connector.eventloop import event_loop_factory

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-6d1f0c2a"
_SELF = psutil.Process()
MB = 1024 * 1024
MODES: dict[str, dict[str, Any]] = {
    "inline": {"executionMode": "inline"},
    "process": {"executionMode": "process", "workers": 2},
}
HAS_PROCESS_ENGINE = hasattr(SourceConfig(), "executionMode")
DEFAULT_MODE = getattr(SourceConfig(), "executionMode", "inline")


@dataclass(frozen=True)
class Size:
    rounds: int
    duration: float        # seconds per measurement (at least min_queries)
    min_queries: int
    warmup: int
    names: int             # scenario (f): distinct names in all
    settle: float = 0.5    # seconds after connecting before the idle RSS is read
    per_query_timeout: float = 30.0


SIZES = {
    "tiny": Size(rounds=1, duration=0.0, min_queries=24, warmup=4, names=300, settle=0.05),
    "full": Size(rounds=3, duration=1.5, min_queries=40, warmup=200, names=10_000),
}


# ---- scenarios ---------------------------------------------------------------------------------------

STREAM_CODE = """import asyncio

async def stream():
    for i in range(10):
        await connector_connection.send_query_response(connector_context, 100, {"row": i})
    await connector_connection.send_query_response(connector_context, 200, {"row": 10})

asyncio.get_event_loop().create_task(stream())
"""
# (i): 1,000 rows of 5 fields, as VAIL wants them; (l): the same rows as a DataFrame, built as pandas
# users build one (columns), named in limitReturnTo: what turning a frame into rows costs
ROWS_CODE = ("rows = [{'id': i, 'name': 'item%d' % i, 'price': i * 0.5, 'qty': i % 7, 'ok': i % 2 == 0} "
             "for i in range(1000)]\n")
FRAME_CODE = """import numpy as np
import pandas as pd
ids = np.arange(1000)
rows = pd.DataFrame({"id": ids, "name": ["item%d" % i for i in range(1000)], "price": ids * 0.5,
                     "qty": ids % 7, "ok": ids % 2 == 0})
"""
# (m): upstream-style code that handles its own reply after awaiting something slow (an HTTP call, say)
IO_WAIT = 0.5
IO_CODE = f"""import asyncio

async def reply():
    await asyncio.sleep({IO_WAIT})
    await connector_connection.send_query_response(connector_context, 200, {{"waited": {IO_WAIT}}})

asyncio.get_event_loop().create_task(reply())
"""
SCRIPT_NAME = "bench_script"
SCRIPT_TEXT = "result = x * 2\n"


def cpu_code(iterations: int) -> str:
    return f"total = 0\nfor i in range({iterations}):\n    total += i * i\n"


def calibrate_cpu(target_seconds: float = 0.010) -> int:
    """Loop iterations that take about `target_seconds` in this interpreter (best of a few)."""
    probe = 100_000
    code = compile(cpu_code(probe), "<calibrate>", "exec")
    best = min(_timed_exec(code) for _ in range(5))
    return max(1000, int(probe * target_seconds / best))


def _timed_exec(code: Any) -> float:
    started = time.perf_counter()
    exec(code, {})  # noqa: S102 - calibrating our own loop
    return time.perf_counter() - started


_SPIN = "n = 0\nfor i in range({0}):\n    n += i\n"   # no clock calls inside: a VM may serialise them


def parallel_capacity(seconds: float = 1.0) -> float:
    """How many cores two busy processes really get here: the same work done by one process alone and by
    two at once, as 2 x (time alone) / (time together); 2.0 on two idle cores, less when other
    processes (other sessions' tests, neighbours) hold the CPU. A rough figure: it moves from second to
    second on a shared machine."""
    def spin(count: int, iterations: int) -> float:
        started = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", _SPIN.format(iterations)]) for _ in range(count)]
        for proc in procs:
            proc.wait()
        return time.perf_counter() - started
    startup = spin(1, 0)
    iterations = int(2_000_000 * seconds / max(spin(1, 2_000_000) - startup, 1e-3))
    alone = spin(1, iterations) - startup
    together = spin(2, iterations) - startup
    return round(2 * alone / together, 2) if together > 0 else float("nan")


@dataclass
class Scenario:
    key: str
    title: str
    concurrency: tuple[int, ...]
    make: Callable[[int], dict[str, Any]]     # the WITH object of the i-th query of a target
    constant: bool = True                      # every query the same: encode once
    partials: int = 0                          # 100 replies expected before the terminal 200
    counted: bool = False                      # (f): a fixed number of queries, split over the rounds
    kinds: tuple[str, ...] = ("ours", "floor", "peer")   # which targets run it
    baseline: Scenario | None = None           # run alternately with it in the same cell (rows "<target>@<key>")
    burst: bool = False                        # each round writes `concurrency` queries at once, then waits
                                               # for all: the figure is the time to answer all
    timeout: float | None = None               # seconds a query may wait for its reply (default: the size's)


def scenarios(cpu_iterations: int) -> list[Scenario]:
    cpu = cpu_code(cpu_iterations)
    rows = Scenario("i", "rows: 1,000 rows x 5 fields as a list of dicts", (8,),
                    lambda i: {"name": "rows", "code": ROWS_CODE})
    return [
        Scenario("a", "cached named code, trivial body", (1, 32),
                 lambda i: {"name": "trivial", "code": "result = x + 1\n", "presetValues": {"x": 1}}),
        Scenario("b", "uncached: new code text every query", (1, 32),
                 lambda i: {"code": f"result = x + {i}\n", "presetValues": {"x": 1}}, constant=False),
        Scenario("c", "script document, cached", (1, 32),
                 lambda i: {"script": SCRIPT_NAME, "presetValues": {"x": 3}}),
        Scenario("d", "codeHandlesReturn: 10 partial rows and a final one", (1, 32),
                 lambda i: {"name": "stream", "code": STREAM_CODE, "codeHandlesReturn": True}, partials=10),
        Scenario("e", "CPU-bound, ~10 ms per query", (1, 32),
                 lambda i: {"name": "cpu", "code": cpu}),
        Scenario("f", "10,000 distinct names through a 128-entry cache", (32,),
                 lambda i: {"name": f"n{i}", "code": f"result = {i}\n"}, constant=False, counted=True),
        rows,
        # ours only: upstream cannot return a DataFrame (nor has pandas), the floors neither. Alternately
        # with (i)'s list of dicts on the same processes: the time ratio is read within the cell
        Scenario("l", "the same rows as a DataFrame, limitReturnTo", (8,),
                 lambda i: {"name": "frame", "code": FRAME_CODE, "limitReturnTo": ["rows"]}, kinds=("ours",),
                 baseline=rows),
        Scenario("m", f"I/O-bound: codeHandlesReturn queries at once, each awaiting {IO_WAIT} s", (2000,),
                 lambda i: {"name": "io_wait", "code": IO_CODE, "codeHandlesReturn": True}, burst=True,
                 timeout=180.0),
    ]


# ---- targets: the processes under test --------------------------------------------------------------

@dataclass
class Target:
    name: str                  # ours/inline, ours/process, floor, upstream
    kind: str                  # ours | floor | peer
    mode: str | None
    source: str
    command: list[str]
    general: dict[str, Any] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None
    ps: psutil.Process | None = None
    workdir: Path | None = None
    next_index: int = 0        # per target, so that uncached scenarios never repeat a text
    connect_timeout: float = 30.0     # seconds from its start until its source must be attached

    async def start(self, server: DevServer, scratch: Path) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.source}-", dir=scratch))
        (self.workdir / "serverConfig").mkdir()
        (self.workdir / "serverConfig" / "server.config").write_text(
            f"targetServer = {server.url}\nauthToken = {TOKEN}\nsources = {self.source}\n")
        server.set_source_config(self.source, self.general)
        server.source(self.source).attached.clear()
        command = self.command
        if self.kind == "floor":
            command = [*command, server.url.replace("http", "ws", 1) + "/api/v1/wsock/websocket", TOKEN,
                       self.source]
        log = open(self.workdir / "output.log", "wb")  # noqa: ASYNC230 - a local file, before the process
        with log:
            self.proc = await asyncio.create_subprocess_exec(*command, cwd=self.workdir, stdout=log,
                                                             stderr=asyncio.subprocess.STDOUT,
                                                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        with contextlib.suppress(psutil.NoSuchProcess):     # else ended already: reported below
            self.ps = psutil.Process(self.proc.pid)
        attached = asyncio.ensure_future(server.wait_attached(self.source, timeout=self.connect_timeout))
        ended = asyncio.ensure_future(self.proc.wait())
        try:
            await asyncio.wait((attached, ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if not attached.done() or attached.exception() is not None:      # ended first, or timed out
            attached.cancel()
            await self.stop()       # whichever caller: nothing of a target that did not start keeps running
            raise RuntimeError(f"{self.name} did not connect; see {self.workdir / 'output.log'}")

    def rss(self) -> tuple[int, int]:
        """(connector process RSS, sum of its child processes' RSS), in bytes."""
        assert self.ps is not None
        try:
            own = self.ps.memory_info().rss
            children = 0
            for child in self.ps.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    children += child.memory_info().rss
            return own, children
        except psutil.Error:
            return 0, 0

    def cpu(self) -> float:
        """CPU seconds used so far by the process and its live children."""
        assert self.ps is not None
        total = 0.0
        with contextlib.suppress(psutil.Error):
            for proc in (self.ps, *self.ps.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    total += times.user + times.system
        return total

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            for child in self._children():
                with contextlib.suppress(psutil.Error):
                    child.kill()
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    def _children(self) -> list[psutil.Process]:
        try:
            return self.ps.children(recursive=True) if self.ps else []
        except psutil.Error:
            return []


# ---- the client: N queries in flight -----------------------------------------------------------------

QUERY_FRAME = '{"op":"query","resourceName":"sources","resourceId":"%s","object":%s,' \
              '"messageHeaders":{"REPLY_ADDR_HEADER":"%s"}}'


@dataclass
class Sample:
    queries: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0             # replies that were not what the scenario expects
    unanswered: int = 0         # queries with no terminal reply within the timeout
    rss_peak: int = 0
    workers_rss_peak: int = 0
    cpu: float = 0.0            # CPU seconds of the target (its children included) while measured
    client_cpu: float = 0.0     # CPU seconds of this process (devserver and client) while measured
    first_error: str | None = None

    @property
    def qps(self) -> float:
        return self.queries / self.seconds if self.seconds else 0.0


class _Reply:
    """The sink of one query's replies (DevServer.route_replies): counts partials, resolves on the last."""
    __slots__ = ("future", "partials")

    def __init__(self, future: asyncio.Future):
        self.future = future
        self.partials = 0

    def __call__(self, frame: dict[str, Any]) -> None:
        if frame.get("status") == 100:
            self.partials += 1
        elif not self.future.done():
            self.future.set_result(frame)


async def drive(server: DevServer, target: Target, scenario: Scenario, concurrency: int, *,
                duration: float, min_queries: int, max_queries: int | None, timeout: float,
                lean: bool = True) -> Sample:
    """Keep `concurrency` queries in flight until `duration` passed and `min_queries` were sent (or
    `max_queries` were sent). Every query must get its terminal reply."""
    loop = asyncio.get_running_loop()
    sample = Sample()
    ids = itertools.count()
    constant = json.dumps(scenario.make(0)) if scenario.constant else None
    ws = server.source(target.source).ws
    if ws is None:
        raise RuntimeError(f"{target.name} is not connected")
    started = time.perf_counter()
    deadline = started + duration
    issued = 0

    def more() -> bool:
        if max_queries is not None and issued >= max_queries:
            return False
        return issued < min_queries or time.perf_counter() < deadline

    async def one(query_object: str) -> dict[str, Any] | None:
        if not lean:
            result = await server.replies_for(await server.send_query(target.source, json.loads(query_object)),
                                              timeout)
            frame = result.replies[-1]
            return frame if len(result.replies) - 1 == scenario.partials else {"status": -1, "body": frame}
        address = f"q{next(ids)}"
        reply = _Reply(loop.create_future())
        server.route_replies(address, reply)
        await ws.send_str(QUERY_FRAME % (target.source, query_object, address))
        try:
            frame = await asyncio.wait_for(reply.future, timeout)
        except TimeoutError:
            return None
        return frame if reply.partials == scenario.partials else {"status": -1, "body": frame}

    async def worker() -> None:
        nonlocal issued
        while more():
            issued += 1
            if constant is not None:
                text = constant
            else:
                text = json.dumps(scenario.make(target.next_index))
                target.next_index += 1
            t0 = time.perf_counter()
            frame = await one(text)
            if frame is None:
                sample.unanswered += 1
                continue
            sample.latencies.append(time.perf_counter() - t0)
            if frame.get("status") != 200:
                sample.errors += 1
                sample.first_error = sample.first_error or json.dumps(frame)[:300]

    async def sampler() -> None:
        while True:
            own, workers = target.rss()
            sample.rss_peak = max(sample.rss_peak, own)
            sample.workers_rss_peak = max(sample.workers_rss_peak, workers)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(sampler())
    cpu_before, client_before = target.cpu(), _SELF.cpu_times()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        watcher.cancel()
    sample.seconds = time.perf_counter() - started
    client_after = _SELF.cpu_times()
    sample.cpu = target.cpu() - cpu_before
    sample.client_cpu = client_after.user + client_after.system - client_before.user - client_before.system
    sample.queries = len(sample.latencies)
    own, workers = target.rss()
    sample.rss_peak = max(sample.rss_peak, own)
    sample.workers_rss_peak = max(sample.workers_rss_peak, workers)
    return sample


# ---- one run ------------------------------------------------------------------------------------------

@dataclass
class Row:
    scenario: str
    title: str
    concurrency: int
    target: str
    mode: str | None
    qps: float
    p50_ms: float
    p99_ms: float
    queries: int
    errors: int
    unanswered: int
    rss_peak_mb: float
    workers_rss_peak_mb: float
    rounds_qps: list[float]
    cpu_pct: float = 0.0                       # the target's CPU use while measured (100 = one core)
    cpu_us_per_query: float = 0.0              # the target's CPU time per query: steadier than q/s
    client_cpu_pct: float = 0.0                # the bench process's own (devserver + client)
    rss_growth: float | None = None            # scenario (f): (end - after warm-up) / after warm-up
    seconds_to_all: float | None = None        # a burst scenario: from the first write to the last reply (median)
    ratios: dict[str, float] = field(default_factory=dict)
    first_error: str | None = None


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def build_targets(args: argparse.Namespace) -> list[Target]:
    ours = _command(args.ours) if args.ours else _console_command()
    targets = [Target(f"ours/{mode}", "ours", mode, f"ours_{mode}", ours, dict(MODES[mode]))
               for mode in args.modes]
    floor = [sys.executable, str(ROOT / "bench" / "floor.py"), *(["--uvloop"] if args.floor_loop == "uvloop" else [])]
    targets.append(Target("floor", "floor", None, "floor", floor))
    if "process" in args.modes and not args.no_process_floor:
        targets.append(Target("floor/process", "floor", None, "floor_process",
                              [sys.executable, str(ROOT / "bench" / "floor_process.py")]))
    if args.peer:
        targets.append(Target("upstream", "peer", args.peer_mode, "upstream", _command(args.peer),
                              dict(MODES[args.peer_mode]) if args.peer_mode else {}))
    return targets


def _command(text: str) -> list[str]:
    """A command line; a relative program path is made absolute (targets run in their own directory)."""
    words = shlex.split(text)
    if words and "/" in words[0] and not os.path.isabs(words[0]):
        words[0] = os.path.abspath(words[0])
    return words


def _console_command() -> list[str]:
    exe = Path(sys.executable).parent / "pyexec-connector"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pyexec_connector"]


async def run_cell(server: DevServer, targets: list[Target], scenario: Scenario, concurrency: int, size: Size,
                   scratch: Path, idle_rss: dict[str, int], lean: bool, progress: Callable[[str], None]
                   ) -> list[Row]:
    for target in targets:
        target.next_index = 0
    started = await asyncio.gather(*(t.start(server, scratch) for t in targets), return_exceptions=True)
    failed = [r for r in started if isinstance(r, BaseException)]
    if failed:      # stop the ones that did start: a process left running skews every later figure
        await asyncio.gather(*(t.stop() for t in targets), return_exceptions=True)
        raise failed[0]
    try:
        await asyncio.sleep(size.settle)
        for target in targets:
            idle_rss.setdefault(target.name, target.rss()[0])
        per_round = -(-size.names // size.rounds) if scenario.counted else concurrency if scenario.burst else None
        # (target, scenario, row name): a scenario with a baseline runs it too, on the same processes,
        # alternately with its own queries, so that the two compare within one run
        runs = [(t, scenario, t.name) for t in targets]
        if scenario.baseline is not None:
            runs += [(t, scenario.baseline, f"{t.name}@{scenario.baseline.key}") for t in targets]
        samples: dict[str, list[Sample]] = {name: [] for _, _, name in runs}
        settled: dict[str, int] = {}
        timeout = scenario.timeout or size.per_query_timeout
        for target, chosen, name in runs:         # warm-up, not measured: caches filled, code paths hot
            await drive(server, target, chosen, min(concurrency, size.warmup), duration=0,
                        min_queries=size.warmup, max_queries=size.warmup, timeout=timeout, lean=lean)
            if scenario.counted:
                own, workers = target.rss()
                settled[name] = own + workers
        for round_no in range(size.rounds):
            for target, chosen, name in runs:
                sample = await drive(server, target, chosen, concurrency,
                                     duration=0 if scenario.burst else size.duration,
                                     min_queries=per_round or size.min_queries, max_queries=per_round,
                                     timeout=timeout, lean=lean)
                samples[name].append(sample)
                progress(f"  ({scenario.key}) c={concurrency} round {round_no + 1}/{size.rounds} {name}: "
                         f"{sample.qps:,.0f} q/s, {sample.errors} errors")
        rows = []
        for target, chosen, name in runs:
            got = samples[name]
            latencies = [x for s in got for x in s.latencies]
            title = scenario.title if chosen is scenario else f"{scenario.title}: ({chosen.key}) alternately"
            row = Row(scenario.key, title, concurrency, name, target.mode,
                      qps=statistics.median(s.qps for s in got),
                      p50_ms=_percentile(latencies, 0.50) * 1000, p99_ms=_percentile(latencies, 0.99) * 1000,
                      queries=sum(s.queries for s in got), errors=sum(s.errors for s in got),
                      unanswered=sum(s.unanswered for s in got),
                      rss_peak_mb=max(s.rss_peak for s in got) / MB,
                      workers_rss_peak_mb=max(s.workers_rss_peak for s in got) / MB,
                      rounds_qps=[round(s.qps, 1) for s in got],
                      cpu_pct=100 * sum(s.cpu for s in got) / sum(s.seconds for s in got),
                      cpu_us_per_query=1e6 * sum(s.cpu for s in got) / max(1, sum(s.queries for s in got)),
                      client_cpu_pct=100 * sum(s.client_cpu for s in got) / sum(s.seconds for s in got),
                      first_error=next((s.first_error for s in got if s.first_error), None))
            if scenario.counted:
                own, workers = target.rss()
                row.rss_growth = (own + workers - settled[name]) / settled[name]
            if scenario.burst:
                row.seconds_to_all = statistics.median(s.seconds for s in got)
            rows.append(row)
        return rows
    finally:
        await asyncio.gather(*(t.stop() for t in targets))


def add_ratios(rows: list[Row]) -> None:
    by_cell: dict[tuple[str, int], dict[str, Row]] = {}
    for row in rows:
        by_cell.setdefault((row.scenario, row.concurrency), {})[row.target] = row
    for cell in by_cell.values():
        for row in cell.values():
            for base in ("floor", "upstream", "floor/process"):
                ref = cell.get(base)
                if ref is None or ref is row:
                    continue
                row.ratios[f"qps_vs_{base}"] = row.qps / ref.qps if ref.qps else float("nan")
                row.ratios[f"p50_vs_{base}"] = row.p50_ms / ref.p50_ms if ref.p50_ms else float("nan")
                row.ratios[f"cpu_vs_{base}"] = (row.cpu_us_per_query / ref.cpu_us_per_query
                                                if ref.cpu_us_per_query else float("nan"))
                if row.seconds_to_all is not None and ref.seconds_to_all:
                    row.ratios[f"seconds_vs_{base}"] = row.seconds_to_all / ref.seconds_to_all


def _find(rows: list[Row], scenario: str, concurrency: int, target: str) -> Row | None:
    return next((r for r in rows if (r.scenario, r.concurrency, r.target) == (scenario, concurrency, target)), None)


def evaluate(rows: list[Row], idle_rss: dict[str, int], modes: list[str],
             capacity: float | None = None, peer_is_ours: bool = False) -> list[dict[str, Any]]:
    """The issues' targets, each pass / fail / skipped (a baseline or an engine mode is missing).
    `peer_is_ours`: the peer is another build of ours (--peer-mode), so "×upstream" reads after/before."""
    default = f"ours/{DEFAULT_MODE}" if DEFAULT_MODE in modes else f"ours/{modes[0]}"
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, op: str, limit: float, missing: str | None = None,
              note: str = "") -> None:
        if value is None or missing:
            checks.append({"target": name, "status": "skipped", "value": None, "limit": f"{op} {limit}",
                           "note": missing or "not measured"})
            return
        ok = value >= limit if op == ">=" else value <= limit if op == "<=" else value < limit
        checks.append({"target": name, "status": "pass" if ok else "fail", "value": round(value, 3),
                       "limit": f"{op} {limit}", "note": note})

    def ratio(scenario: str, c: int, target: str, key: str) -> float | None:
        row = _find(rows, scenario, c, target)
        return row.ratios.get(key) if row else None

    no_peer = None if any(r.target == "upstream" for r in rows) else "no --peer given"
    check(f"(a) c=32 {default} q/s vs upstream", ratio("a", 32, default, "qps_vs_upstream"), ">=", 1.5, no_peer)
    check(f"(a) c=32 {default} q/s vs floor", ratio("a", 32, default, "qps_vs_floor"), ">=", 0.9)
    check(f"(a) c=1 {default} p50 vs upstream", ratio("a", 1, default, "p50_vs_upstream"), "<=", 0.9, no_peer)
    check(f"(b) c=32 {default} q/s vs upstream", ratio("b", 32, default, "qps_vs_upstream"), ">=", 1.5, no_peer)
    inline, process = _find(rows, "e", 32, "ours/inline"), _find(rows, "e", 32, "ours/process")
    engine_missing = None if HAS_PROCESS_ENGINE else "this build has no process engine"
    capacity_note = (f"two busy processes got {capacity:.2f} cores' worth on this machine just before"
                     if capacity is not None else "")
    check("(e) c=32 process (workers 2) q/s vs inline",
          process.qps / inline.qps if inline and process and inline.qps else None, ">=", 1.7, engine_missing,
          capacity_note)
    check(f"(i) c=8 {default} q/s vs upstream", ratio("i", 8, default, "qps_vs_upstream"), ">=", 2.5, no_peer)
    for mode in modes:
        rows_list, frame = _find(rows, "l", 8, f"ours/{mode}@i"), _find(rows, "l", 8, f"ours/{mode}")
        check(f"(l) c=8 ours/{mode} time per query vs (i), alternately",
              rows_list.qps / frame.qps if rows_list and frame and frame.qps else None, "<=", 1.3)
    peer_idle = idle_rss.get("upstream")
    check(f"idle RSS {default} vs upstream",
          idle_rss[default] / peer_idle if peer_idle and default in idle_rss else None, "<=", 1.2, no_peer)
    for mode in modes:
        row = next((r for r in rows if r.scenario == "f" and r.target == f"ours/{mode}"), None)
        check(f"(f) RSS growth ours/{mode}", row.rss_growth if row else None, "<", 0.10)
    # issue 20: process mode against the isolated floor (floor/process); the I/O-bound burst; CPU per query
    no_floor = None if any(r.target == "floor/process" for r in rows) else "no floor/process in this run"
    check("(a) c=32 ours/process q/s vs floor/process", ratio("a", 32, "ours/process", "qps_vs_floor/process"),
          ">=", 0.9, no_floor)
    check("(a) c=1 ours/process p50 vs floor/process", ratio("a", 1, "ours/process", "p50_vs_floor/process"),
          "<=", 1.15, no_floor)
    for mode in modes:
        for row in (r for r in rows if r.scenario == "m" and r.target == f"ours/{mode}"):
            check(f"(m) c={row.concurrency} ours/{mode} time to answer all vs upstream",
                  row.ratios.get("seconds_vs_upstream"), "<=", 3.0, no_peer)
    not_ours = None if peer_is_ours else "the peer is not a build of ours (--peer-mode)"
    for c in (1, 32):
        check(f"(a) c={c} ours/process CPU per query vs the peer build",
              ratio("a", c, "ours/process", "cpu_vs_upstream"), "<=", 1.0, no_peer or not_ours)
    return checks


# ---- output ---------------------------------------------------------------------------------------------

def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "–" if value is None or value != value else pattern.format(value)


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"Run {meta['date']} on {meta['machine']}; size `{meta['size']}`, {meta['rounds']} alternating rounds.",
        f"Build `{meta.get('commit')}`, event loop of ours: {meta.get('event_loop')}, engine default: "
        f"`{meta['default_mode']}`. Command: `{meta['command']}`",
        *([] if meta["process_engine"] else [
            "", "This build has no process engine: the `ours/process` rows ran inline (the mode key was ignored)."]),
        *([] if meta.get("parallel_capacity") is None else [
            "", f"Two busy processes got {meta['parallel_capacity']:.2f} cores' worth of CPU on this machine "
                "during the run (2.00 on two idle cores)."]),
        "",
        "| scenario | c | target | q/s | ×floor | ×upstream | ×floor/process | p50 ms | p50 ×upstream | "
        "p50 ×floor/process | p99 ms | RSS MB | workers MB | CPU % | CPU µs/q | CPU ×upstream | bench CPU % | "
        "queries | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        ratios = row["ratios"]
        growth = f" (growth {row['rss_growth'] * 100:+.1f} %)" if row["rss_growth"] is not None else ""
        lines.append(
            f"| ({row['scenario']}) {row['title']} | {row['concurrency']} | {row['target']} | {row['qps']:,.0f} | "
            f"{_fmt(ratios.get('qps_vs_floor'))} | {_fmt(ratios.get('qps_vs_upstream'))} | "
            f"{_fmt(ratios.get('qps_vs_floor/process'))} | {row['p50_ms']:.2f} | "
            f"{_fmt(ratios.get('p50_vs_upstream'))} | {_fmt(ratios.get('p50_vs_floor/process'))} | "
            f"{row['p99_ms']:.2f} | {row['rss_peak_mb']:.1f}{growth} | {row['workers_rss_peak_mb']:.1f} | "
            f"{row['cpu_pct']:.0f} | {row['cpu_us_per_query']:.0f} | {_fmt(ratios.get('cpu_vs_upstream'))} | "
            f"{row['client_cpu_pct']:.0f} | "
            f"{row['queries']} | "
            f"{row['errors'] + row['unanswered']} |")
    bursts = [row for row in report["rows"] if row.get("seconds_to_all") is not None]
    if bursts:
        lines += ["", "| burst scenario | queries at once | target | all answered, s | ×upstream | ×floor/process "
                      "| p50 ms | p99 ms | CPU µs/q | errors |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| ({row['scenario']}) {row['title']} | {row['concurrency']} | {row['target']} | "
                  f"{row['seconds_to_all']:.2f} | {_fmt(row['ratios'].get('seconds_vs_upstream'))} | "
                  f"{_fmt(row['ratios'].get('seconds_vs_floor/process'))} | {row['p50_ms']:.1f} | "
                  f"{row['p99_ms']:.1f} | {row['cpu_us_per_query']:.0f} | {row['errors'] + row['unanswered']} |"
                  for row in bursts]
    lines += ["", "| idle RSS (connector process) | MB |", "|---|---:|"]
    lines += [f"| {name} | {rss / MB:.1f} |" for name, rss in report["idle_rss"].items()]
    lines += ["", "| target | limit | value | result |", "|---|---|---:|---|"]
    for check in report["checks"]:
        result = check["status"].upper() + (f" ({check['note']})" if check["note"] else "")
        lines.append(f"| {check['target']} | {check['limit']} | {_fmt(check['value'], '{:.3f}')} | {result} |")
    return "\n".join(lines) + "\n"


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except OSError:
        return None


def machine() -> str:
    return (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


NOTES_HEADING = "\n## Notes\n"


def update_docs(report: dict[str, Any], table: str, path: Path = ROOT / "docs" / "PERFORMANCE.md") -> Path:
    """Write the run to the page; a hand-written '## Notes' section already there is kept."""
    path.parent.mkdir(exist_ok=True)
    old = path.read_text() if path.exists() else ""
    notes = old[old.index(NOTES_HEADING):] if NOTES_HEADING in old else ""
    path.write_text(
        "# Performance\n\n"
        "The latest full run of the benchmark suite (`bench/`, see `bench/README.md`). Ratios come from one "
        "run in which the targets were measured alternately; absolute figures drift on shared machines, "
        "ratios much less.\n\n"
        f"- Date: {report['meta']['date']}\n- Machine: {report['meta']['machine']}\n"
        f"- Command: `{report['meta']['command']}`\n\n" + table + notes)
    return path


# ---- entry -----------------------------------------------------------------------------------------------

def side_parser(prog: str, doc: str | None, modes: str) -> argparse.ArgumentParser:
    """The options every side command of the bench (burst, slow_server) takes: what runs and how often."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    parser.add_argument("--peer", metavar="CMD", help="the upstream connector's command (or another build of ours)")
    parser.add_argument("--peer-mode", choices=sorted(MODES), help="engine mode of the peer when it is ours")
    parser.add_argument("--ours", metavar="CMD", help="our connector's command (default: the console script)")
    parser.add_argument("--modes", default=modes, help=f"engine modes of ours (default: {modes})")
    parser.add_argument("--rounds", type=int, default=1)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", metavar="CMD",
                        help="the upstream connector's command, e.g. /work/upstream-venv/bin/vantiqPythonExecConnector")
    parser.add_argument("--peer-mode", choices=sorted(MODES),
                        help="run the peer in this engine mode (when the peer is another build of ours; "
                             "default: the peer's own default configuration)")
    parser.add_argument("--ours", metavar="CMD", help="our connector's command (default: the installed console "
                                                      "script)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--rounds", type=int, help="override the size's number of alternating rounds")
    parser.add_argument("--duration", type=float, help="override the size's seconds per measurement")
    parser.add_argument("--concurrency", help="override every scenario's concurrencies, e.g. '4' or '1,32'")
    parser.add_argument("--scenarios", default="abcdefilm", help="which scenarios, e.g. 'ab' (default all)")
    parser.add_argument("--modes", default=",".join(MODES), help="engine modes of ours (default inline,process)")
    parser.add_argument("--no-process-floor", action="store_true",
                        help="leave out floor/process (the floor split over two processes, bench/floor_process.py)")
    parser.add_argument("--floor-loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="the event loop of the in-process floor (bench/floor.py); ours runs on uvloop when "
                             "it is installed")
    parser.add_argument("--client", choices=("lean", "devserver"), default="lean",
                        help="lean: pre-encoded frames and a reply callback; devserver: DevServer.send_query and "
                             "replies_for (to measure the client's own cost)")
    parser.add_argument("--out", default="bench-results", help="directory for results.json and results.md")
    parser.add_argument("--update-docs", action="store_true", help="write the table to docs/PERFORMANCE.md")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    return args


async def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    size = SIZES[args.size]
    if args.rounds or args.duration is not None:
        size = replace(size, rounds=args.rounds or size.rounds,
                       duration=size.duration if args.duration is None else args.duration)
    progress = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    cpu_iterations = calibrate_cpu()
    capacity = parallel_capacity() if size.duration else None
    capacity_e: float | None = None
    chosen = [s for s in scenarios(cpu_iterations) if s.key in args.scenarios]
    if args.concurrency:
        levels = tuple(int(c) for c in args.concurrency.split(","))
        chosen = [replace(s, concurrency=levels) for s in chosen]
    targets = build_targets(args)
    rows: list[Row] = []
    idle_rss: dict[str, int] = {}
    server = DevServer(token=TOKEN, sources=tuple(t.source for t in targets))
    server.put_document(SCRIPT_NAME, SCRIPT_TEXT)
    with tempfile.TemporaryDirectory(prefix="pyexec-bench-") as scratch:
        async with server:
            for scenario in chosen:
                for concurrency in scenario.concurrency:
                    progress(f"({scenario.key}) {scenario.title}, concurrency {concurrency}")
                    if scenario.key == "e" and concurrency > 1 and size.duration:
                        # what (e) can gain from a second worker depends on the cores free right now
                        capacity_e = await asyncio.to_thread(parallel_capacity)
                    cell = [t for t in targets if t.kind in scenario.kinds]
                    rows += await run_cell(server, cell, scenario, concurrency, size, Path(scratch), idle_rss,
                                           args.client == "lean", progress)
    add_ratios(rows)
    return {
        "meta": {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                 "cores": os.cpu_count(), "python": platform.python_version(), "size": args.size,
                 "rounds": size.rounds, "duration_s": size.duration, "client": args.client,
                 "modes": args.modes, "scenarios": args.scenarios, "default_mode": DEFAULT_MODE,
                 "process_engine": HAS_PROCESS_ENGINE, "parallel_capacity": capacity,
                 "parallel_capacity_before_e": capacity_e,
                 "cpu_iterations": cpu_iterations, "command": command, "commit": _commit(),
                 "event_loop": event_loop_factory()[1]},
        "rows": [asdict(r) for r in rows],
        "idle_rss": idle_rss,
        "checks": evaluate(rows, idle_rss, args.modes, capacity_e or capacity, args.peer_mode is not None),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = asyncio.run(run(args, command.strip()))
    table = markdown(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(table)
    if args.update_docs:
        update_docs(report, table)
    print(table)
    for check in report["checks"]:
        print(f"{check['status'].upper():7} {check['target']}: {_fmt(check['value'], '{:.3f}')} "
              f"(limit {check['limit']}){' - ' + check['note'] if check['note'] else ''}")
    unanswered = sum(r["unanswered"] for r in report["rows"])
    return 1 if unanswered else 0


if __name__ == "__main__":
    sys.exit(main())

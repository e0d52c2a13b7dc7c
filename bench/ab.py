"""Targets measured alternately, one cell at a time: q/s, p50 and CPU per query of each (the connector
and its workers, from /proc), round by round. For comparisons the suite's table does not make: a build
against itself with another source configuration, or against another build's `src/`.

    python -m bench.ab SPEC [SPEC ...]      (environment: C concurrency 32, R rounds 4, D seconds 1.5,
                                             S scenario key a)

SPEC: `floor`, `floor/process`, `ours:MODE` (inline or process), `ours:MODE:KEY=JSON,...` (source
configuration keys, e.g. `ours:process:keepChildProcesses=true`), `ours:MODE@PATH` (the `src/` of another
build on PYTHONPATH). Two targets of the same kind in one run show the order's own effect."""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from pyexec_connector.devserver import DevServer

from .run import MODES, ROOT, SCRIPT_NAME, SCRIPT_TEXT, TOKEN, Target, _console_command, calibrate_cpu, drive, scenarios


def target(spec: str, index: int) -> Target:
    if spec == "floor":
        return Target(spec, "floor", None, f"floor{index}", [sys.executable, str(ROOT / "bench" / "floor.py"),
                                                             "--uvloop"])
    if spec == "floor/process":
        return Target(spec, "floor", None, f"floorp{index}", [sys.executable, str(ROOT / "bench" / "floor_process.py")])
    body, _, path = spec.partition("@")
    kind, mode, *rest = body.split(":")
    if kind != "ours" or mode not in MODES:
        raise SystemExit(f"unknown target {spec!r}")
    general = dict(MODES[mode])
    for pair in filter(None, (rest[0] if rest else "").split(",")):
        key, _, value = pair.partition("=")
        general[key] = json.loads(value)
    command = ["env", f"PYTHONPATH={path}", sys.executable, "-m", "pyexec_connector"] if path else _console_command()
    return Target(spec, "ours", mode, f"src{index}", command, general)


async def main(specs: list[str]) -> None:
    concurrency, rounds = int(os.environ.get("C", "32")), int(os.environ.get("R", "4"))
    seconds = float(os.environ.get("D", "1.5"))
    scenario = next(s for s in scenarios(calibrate_cpu()) if s.key == os.environ.get("S", "a"))
    targets = [target(spec, i) for i, spec in enumerate(specs)]
    server = DevServer(token=TOKEN, sources=tuple(t.source for t in targets))
    server.put_document(SCRIPT_NAME, SCRIPT_TEXT)
    results: dict[str, list[tuple[float, float, float, int]]] = {t.name: [] for t in targets}
    with tempfile.TemporaryDirectory() as scratch:
        async with server:
            try:
                for t in targets:
                    await t.start(server, Path(scratch))
                    await drive(server, t, scenario, concurrency, duration=1.0, min_queries=200, max_queries=None,
                                timeout=30)
                for number in range(rounds):
                    for t in targets if number % 2 == 0 else targets[::-1]:
                        sample = await drive(server, t, scenario, concurrency, duration=seconds, min_queries=1,
                                             max_queries=None, timeout=30)
                        latencies = sorted(sample.latencies)
                        results[t.name].append((sample.qps, latencies[len(latencies) // 2] * 1e3,
                                                1e6 * sample.cpu / max(1, sample.queries), sample.errors))
            finally:
                for t in targets:
                    await t.stop()
    for name, rows in results.items():
        qps, p50, cpu = (statistics.median(row[i] for row in rows) for i in range(3))
        print(f"{name:45s} q/s {qps:8.0f}  p50 {p50:6.3f} ms  CPU {cpu:6.1f} us/q  errors "
              f"{sum(row[3] for row in rows)}  rounds {[round(row[0]) for row in rows]}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    asyncio.run(main(sys.argv[1:]))

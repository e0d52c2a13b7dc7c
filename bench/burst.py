"""Scenario (k), "burst": many trivial queries at once, and at a high steady rate, with no "busy".

    python -m bench.burst [--peer CMD] [--peer-mode MODE] [--modes process] [--burst 5000] [--rate 10000]
                          [--seconds 5] [--rounds 1]

For each target (ours per engine mode, in its default configuration otherwise; then the peer), alternately
for `--rounds` rounds, on a fresh process each time (warmed by one query):
- "burst": `--burst` trivial queries (`x = 1`) written to the websocket at once;
- "rate": `--rate` queries per second for `--seconds` s (a batch every 10 ms), whatever comes back.
Reported per target and phase: queries answered 200, "busy", other errors, unanswered; p50/p99 latency
(from the frame's write to its reply); the seconds until the last reply (from the first write); the peak
RSS of the connector process and of its workers. Writes `burst.json` into `--out`; exits 1 if ours
answered anything but 200."""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyexec_connector.devserver import DevServer

from .run import MB, QUERY_FRAME, TOKEN, Target, _command, _console_command, _percentile, side_parser

QUERY = json.dumps({"code": "x = 1"})
BUSY = "io.vantiq.pyexecsource.busy"
TICK = 0.01


@dataclass
class Result:
    target: str
    phase: str
    round: int
    sent: int
    ok: int
    busy: int
    other_errors: int
    unanswered: int
    p50_ms: float | None
    p99_ms: float | None
    seconds: float | None          # first write to last reply
    peak_rss_mb: float
    peak_workers_rss_mb: float
    first_error: str | None = None


async def _phase(server: DevServer, target: Target, phase: str, round_: int, batches: list[int],
                 timeout: float) -> Result:
    loop = asyncio.get_running_loop()
    ws = server.source(target.source).ws
    assert ws is not None
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    counts = {"ok": 0, "busy": 0, "other": 0}
    first_error: list[str] = []
    total = sum(batches)
    all_in = loop.create_future()

    def sink_for(address: str):
        def sink(frame: dict[str, Any]) -> None:
            if frame.get("status") == 100:
                return
            latencies.append(time.perf_counter() - sent_at[address])
            body = frame.get("body")
            if frame.get("status") == 200:
                counts["ok"] += 1
            elif isinstance(body, dict) and body.get("messageCode") == BUSY:
                counts["busy"] += 1
            else:
                counts["other"] += 1
                if not first_error:
                    first_error.append(json.dumps(frame)[:300])
            if len(latencies) == total and not all_in.done():
                all_in.set_result(None)
        return sink

    peak = [0, 0]

    async def sampler() -> None:
        while True:
            own, workers = target.rss()
            peak[0], peak[1] = max(peak[0], own), max(peak[1], workers)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(sampler())
    started = time.perf_counter()
    n = 0
    try:
        for i, size in enumerate(batches):
            due = started + i * TICK
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            for _ in range(size):
                address = f"{target.source}-{phase}-{round_}-{n}"
                n += 1
                server.route_replies(address, sink_for(address))
                sent_at[address] = time.perf_counter()
                await ws.send_str(QUERY_FRAME % (target.source, QUERY, address))
        try:
            await asyncio.wait_for(asyncio.shield(all_in), timeout)
            seconds: float | None = time.perf_counter() - started
        except TimeoutError:
            seconds = None
    finally:
        watcher.cancel()
    ms = sorted(v * 1000 for v in latencies)
    return Result(target.name, phase, round_, total, counts["ok"], counts["busy"], counts["other"],
                  total - len(latencies), _percentile(ms, 0.5) if ms else None, _percentile(ms, 0.99) if ms else None,
                  seconds, peak[0] / MB, peak[1] / MB, first_error[0] if first_error else None)


async def one_target(server: DevServer, target: Target, args: argparse.Namespace, scratch: Path,
                     round_: int) -> list[Result]:
    await target.start(server, scratch)
    try:
        warm = await server.query({"code": "warm = 1"}, source=target.source, timeout=60)
        if warm.status != 200:
            raise RuntimeError(f"{target.name} did not answer a first query: {warm.replies}")
        per_tick = max(1, round(args.rate * TICK))
        results = [await _phase(server, target, "burst", round_, [args.burst], args.timeout)]
        results.append(await _phase(server, target, "rate", round_,
                                    [per_tick] * round(args.seconds / TICK), args.timeout))
        return results
    finally:
        await target.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = side_parser("python -m bench.burst", __doc__, "process")
    parser.add_argument("--burst", type=int, default=5000, help="queries written at once (default 5000)")
    parser.add_argument("--rate", type=int, default=10000, help="queries per second (default 10000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds at that rate (default 5)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed for the last reply")
    parser.add_argument("--out", default="bench-results", help="directory for burst.json")
    return parser.parse_args(argv)


def table(results: list[Result]) -> str:
    def num(value: float | None, pattern: str = "{:.1f}") -> str:
        return pattern.format(value) if value is not None else "-"

    lines = ["| target | phase | round | sent | 200 | busy | other | unanswered | p50 ms | p99 ms | s to last | "
             "RSS MB | workers MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.target} | {r.phase} | {r.round} | {r.sent} | {r.ok} | {r.busy} | {r.other_errors} | "
                     f"{r.unanswered} | {num(r.p50_ms)} | {num(r.p99_ms)} | {num(r.seconds, '{:.2f}')} | "
                     f"{r.peak_rss_mb:.0f} | {r.peak_workers_rss_mb:.0f} |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[Result]:
    ours = _command(args.ours) if args.ours else _console_command()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    # the default configuration: only the engine mode is set (process mode's workers: one per core)
    targets = [Target(f"ours/{mode}", "ours", mode, f"ours_{mode}", ours, {"executionMode": mode}) for mode in modes]
    if args.peer:
        targets.append(Target("upstream", "peer", args.peer_mode, "upstream", _command(args.peer),
                              {"executionMode": args.peer_mode} if args.peer_mode else {}))
    results: list[Result] = []
    server = DevServer(token=TOKEN, sources=tuple(t.source for t in targets))
    with tempfile.TemporaryDirectory(prefix="pyexec-burst-") as scratch:
        async with server:
            for round_ in range(1, args.rounds + 1):
                for target in targets:
                    print(f"(k) {target.name}, round {round_}", file=sys.stderr, flush=True)
                    results.extend(await one_target(server, target, args, Path(scratch), round_))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.burst " + shlex.join(sys.argv[1:] if argv is None else argv)
    (out / "burst.json").write_text(json.dumps(
        {"command": command.strip(), "args": vars(args), "results": [asdict(r) for r in results]}, indent=2))
    print(table(results))
    ours_clean = all(r.ok == r.sent for r in results if r.target.startswith("ours/"))
    return 0 if ours_clean else 1


if __name__ == "__main__":
    sys.exit(main())

"""Scenario (j), "slow server": code streams large partial replies while the server stops reading.

    python -m bench.slow_server [--peer CMD] [--modes inline,process] [--frames 300] [--frame-mb 4] [--pause 20]

For each target (ours per engine mode, then the peer), alternately for `--rounds` rounds: a fresh process,
one query whose code (`codeHandlesReturn`, in the upstream style: a task on the current loop) sends
`--frames` partial replies of `--frame-mb` MB and a last one. The server stops reading its socket just
before the query and resumes after `--pause` seconds. Reported per target: the peak RSS of the connector
process and of its workers while paused, whether every frame arrived in order, and how long the stream
took to arrive after the server resumed. The peak RSS is also given as a ratio to the peer's.

The upstream connector awaits each websocket send, so it stays small; the point of the scenario is that
ours does too (maxPendingBytes), without losing or reordering a frame."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyexec_connector.devserver import DevServer

from .run import MB, MODES, TOKEN, Target, _command, _console_command, side_parser

STREAM = """import asyncio

async def stream():
    big = "x" * size
    for i in range(count):
        await connector_connection.send_query_response(connector_context, 100, {"i": i, "data": big})
    await connector_connection.send_query_response(connector_context, 200, {"i": count})

asyncio.get_event_loop().create_task(stream())
"""
SAMPLE_EVERY = 0.1


@dataclass
class Result:
    target: str
    round: int
    peak_rss_mb: float            # connector process, while paused
    peak_workers_rss_mb: float    # its child processes, while paused
    in_order: bool                # every frame arrived, in order
    frames_received: int
    seconds_after_resume: float | None   # until the last frame arrived (None: it did not)
    ratio_to_peer: float | None = None


async def one_stream(server: DevServer, target: Target, args: argparse.Namespace, scratch: Path,
                     round_: int) -> Result:
    await target.start(server, scratch)
    try:
        address = f"{target.source}-stream-{round_}"
        seen: list[int] = []
        done = asyncio.get_running_loop().create_future()

        def sink(frame: dict[str, Any]) -> None:
            body = frame.get("body")
            seen.append(body.get("i", -1) if isinstance(body, dict) else -1)
            if frame.get("status") != 100 and not done.done():
                done.set_result(frame.get("status"))

        server.route_replies(address, sink)
        server.pause_reading()
        params = {"code": STREAM, "codeHandlesReturn": True,
                  "presetValues": {"size": int(args.frame_mb * MB), "count": args.frames}}
        await server.send_frame(target.source, {
            "op": "query", "resourceName": "sources", "resourceId": target.source, "object": params,
            "messageHeaders": {"REPLY_ADDR_HEADER": address}})
        peak = peak_workers = 0
        loop = asyncio.get_running_loop()
        until = loop.time() + args.pause
        while loop.time() < until:
            own, workers = target.rss()
            peak, peak_workers = max(peak, own), max(peak_workers, workers)
            await asyncio.sleep(SAMPLE_EVERY)
        resumed = time.perf_counter()
        server.resume_reading()
        took: float | None = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), args.timeout)
            took = time.perf_counter() - resumed
        return Result(target.name, round_, peak / MB, peak_workers / MB, seen == list(range(args.frames + 1)),
                      len(seen), took)
    finally:
        server.resume_reading()
        await target.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = side_parser("python -m bench.slow_server", __doc__, "inline,process")
    parser.add_argument("--frames", type=int, default=300, help="partial replies streamed (default 300)")
    parser.add_argument("--frame-mb", type=float, default=4.0, help="size of each, in MB (default 4)")
    parser.add_argument("--pause", type=float, default=20.0, help="seconds the server stops reading (default 20)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for delivery after resuming")
    parser.add_argument("--out", default="bench-results", help="directory for slow_server.json")
    return parser.parse_args(argv)


def table(results: list[Result]) -> str:
    lines = ["| target | round | peak RSS MB | workers RSS MB | ×peer | frames | in order | s after resume |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r.ratio_to_peer:.2f}" if r.ratio_to_peer is not None else "-"
        took = f"{r.seconds_after_resume:.1f}" if r.seconds_after_resume is not None else "never"
        lines.append(f"| {r.target} | {r.round} | {r.peak_rss_mb:.0f} | {r.peak_workers_rss_mb:.0f} | {ratio} | "
                     f"{r.frames_received} | {'yes' if r.in_order else 'NO'} | {took} |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[Result]:
    ours = _command(args.ours) if args.ours else _console_command()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    targets = [Target(f"ours/{mode}", "ours", mode, f"ours_{mode}", ours, dict(MODES[mode])) for mode in modes]
    if args.peer:
        targets.append(Target("upstream", "peer", args.peer_mode, "upstream", _command(args.peer),
                              dict(MODES[args.peer_mode]) if args.peer_mode else {}))
    results: list[Result] = []
    server = DevServer(token=TOKEN, sources=tuple(t.source for t in targets))
    with tempfile.TemporaryDirectory(prefix="pyexec-slow-") as scratch:
        async with server:
            for round_ in range(1, args.rounds + 1):
                peer_peak = None
                for target in targets:
                    print(f"(j) {target.name}, round {round_}", file=sys.stderr, flush=True)
                    result = await one_stream(server, target, args, Path(scratch), round_)
                    results.append(result)
                    if target.kind == "peer":
                        peer_peak = result.peak_rss_mb + result.peak_workers_rss_mb
                if peer_peak:
                    for result in results[-len(targets):]:
                        result.ratio_to_peer = (result.peak_rss_mb + result.peak_workers_rss_mb) / peer_peak
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.slow_server " + shlex.join(sys.argv[1:] if argv is None else argv)
    (out / "slow_server.json").write_text(json.dumps(
        {"command": command.strip(), "args": vars(args), "results": [asdict(r) for r in results]}, indent=2))
    print(table(results))
    return 0 if all(r.in_order for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Profile the connector process under load with py-spy (sampling, from outside the process).

    python -m bench.profile [--scenario a] [--concurrency 32] [--mode inline] [--seconds 8] [--out DIR]

Prints the functions with the most samples, on the CPU itself (self) and below them (total), and keeps
py-spy's collapsed stacks (DIR/profile.txt) for a flame graph. Needs `py-spy` on PATH or in the venv."""
from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import sys
import tempfile
from pathlib import Path

from pyexec_connector.devserver import DevServer

from .run import MODES, SCRIPT_NAME, SCRIPT_TEXT, TOKEN, Target, _console_command, calibrate_cpu, drive, scenarios


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy not found: pip install py-spy")
    return found


def summarise(collapsed: Path, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    lines = [f"{samples} samples", "", "self:"]
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "total:"]
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in total.most_common(top)]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    scenario = next(s for s in scenarios(calibrate_cpu()) if s.key == args.scenario)
    target = Target(f"ours/{args.mode}", "ours", args.mode, "profiled", _console_command(), dict(MODES[args.mode]))
    server = DevServer(token=TOKEN, sources=(target.source,))
    server.put_document(SCRIPT_NAME, SCRIPT_TEXT)
    collapsed: Path = args.collapsed
    with tempfile.TemporaryDirectory() as scratch:
        async with server:
            await target.start(server, Path(scratch))
            try:
                await drive(server, target, scenario, args.concurrency, duration=1.0, min_queries=200,
                            max_queries=None, timeout=30)
                spy = await asyncio.create_subprocess_exec(
                    _py_spy(), "record", "--pid", str(target.proc.pid), "--duration", str(int(args.seconds)),
                    "--rate", "500", "--format", "raw", "--output", str(collapsed), "--nonblocking",
                    *(["--subprocesses"] if args.mode == "process" else []),
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
                sample = await drive(server, target, scenario, args.concurrency, duration=args.seconds + 1,
                                     min_queries=1, max_queries=None, timeout=30)
                _, errors = await spy.communicate()
                if spy.returncode:
                    raise SystemExit(f"py-spy failed: {errors.decode()[-500:]}")
            finally:
                await target.stop()
    print(f"{sample.qps:,.0f} q/s while profiled; {1e6 * sample.cpu / max(sample.queries, 1):.0f} CPU us/query")
    print(summarise(collapsed))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="a")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--mode", choices=sorted(MODES), default="inline")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--out", default="bench-results")
    arguments = parser.parse_args()
    Path(arguments.out).mkdir(parents=True, exist_ok=True)
    arguments.collapsed = Path(arguments.out, "profile.txt").resolve()
    asyncio.run(main(arguments))

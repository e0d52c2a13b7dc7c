"""A worker process's own cost per query, without a connector: this script plays the connector's side of
one worker's pipe (Init, then bench (a)'s relayed query, `CONC` at a time, each answered before the next
is sent) and reads the worker's CPU time (/proc/PID/schedstat, nanoseconds) and context switches.
The worker is the real one (`python -m pyexec_connector.engine.worker`), on uvloop when installed.

Run: python -m bench.worker_cost [--conc N] [--queries N] [--rounds N] [--gap US] [--keep] [--floor]
[--profile FILE] [--script] (--gap: microseconds this side sleeps before each write, so that the worker
sleeps between queries as it does behind a connector at c=1; --keep: keepChildProcesses, i.e. without
issue 21's per-query hooks; --floor: bench/floor_process.py's worker instead; --profile: cProfile the
worker; --script: bench (a)'s query as the connector sends it, a `script` parsed into a Job (`Run`),
instead of a relayed frame of named code)."""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

from pyexec_connector import protocol
from pyexec_connector.engine import messages, wire
from pyexec_connector.engine.base import Job
from pyexec_connector.request import parse_query

FRAME = protocol.dumps({"op": "query", "resourceName": "sources", "resourceId": "bench",
                        "messageHeaders": {"REPLY_ADDR_HEADER": "reply-address-0123456789"},
                        "object": {"name": "trivial", "code": "result = x + 1\n", "presetValues": {"x": 1}}}).encode()


def settings(keep: bool) -> dict:
    return {"source_name": "bench", "server_config": {}, "healthy": True, "cache_capacity": 128, "forbid": (),
            "memory_limit_mb": None, "runtime_info": False, "rich_results": False, "max_message_bytes": None,
            "max_open_files": None, "max_processes": None, "queries_per_worker": 500,
            "keep_child_processes": keep}


class Pipe:
    def __init__(self, sock: socket.socket, floor: bool):
        self.sock, self.floor = sock, floor
        self.buffer = bytearray()

    def messages(self) -> list:
        """Whatever whole messages one read brings (blocking until at least one)."""
        while True:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError
            self.buffer += data
            out, start = [], 0
            while len(self.buffer) - start >= 4:
                length = wire.LENGTH.unpack_from(self.buffer, start)[0]
                if len(self.buffer) - start - 4 < length:
                    break
                body = bytes(self.buffer[start + 4:start + 4 + length])
                out.append(body if self.floor else wire.decode(body, False))
                start += 4 + length
            del self.buffer[:start]
            if out:
                return out


def cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as fp:
        return int(fp.read().split()[0])


def switches(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as fp:
        fields = dict(line.split(":\t") for line in fp.read().splitlines() if ":\t" in line)
    return int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"])


# bench (a)'s query (bench/run.py) as the process engine sends it: a script, parsed into a Job carrying the
# document's text and modification time
SCRIPT_JOB = Job(parse_query({"script": "bench_script", "presetValues": {"x": 3}}), "result = x * 2\n",
                 "2026-01-01T00:00:00.000Z", False, 120.0, False)


def run(pipe: Pipe, conc: int, queries: int, first_qid: int, gap: float, floor: bool, busy: bool = False,
        script: bool = False) -> int:
    """`queries` queries, at most `conc` in flight; returns the next qid."""
    qid, sent, answered = first_qid, 0, 0
    relay = wire.encode(messages.Relay(0, "reply-address-0123456789", "result = x + 1\n", FRAME, 1e18))
    head, body = relay[:5], relay[13:]
    plain = wire.LENGTH.pack(len(FRAME)) + FRAME

    def encoded(q: int) -> bytes:
        if script:
            return wire.encode_run(messages.Run(q, SCRIPT_JOB, "reply-address-0123456789", 0.0), 1e18)
        return plain if floor else head + struct.pack("!Q", q) + body

    batch = []
    while sent < min(conc, queries):
        batch.append(encoded(qid))
        qid += 1
        sent += 1
    pipe.sock.sendall(b"".join(batch))
    while answered < queries:
        out = []
        for message in pipe.messages():
            if floor or type(message) in (messages.Answered, messages.Done):
                answered += 1
                if sent < queries:
                    out.append(encoded(qid))
                    qid += 1
                    sent += 1
            elif type(message) is messages.Failed:
                raise RuntimeError(message)
        if out:
            if gap:
                if busy:
                    until = time.perf_counter() + gap
                    while time.perf_counter() < until:     # other Python code on this core meanwhile
                        sum(range(50))
                else:
                    time.sleep(gap)
            pipe.sock.sendall(b"".join(out))
    return qid


def instructions(out: str, pid: int, queries: int) -> int:
    """Instructions per query in the dump taken after the measured queries (the counters were zeroed
    before them)."""
    import glob
    for path in glob.glob(f"{out}.*"):
        with open(path) as fp:
            text = fp.read()
        if "Trigger: dump" in text:
            summary = next(line for line in text.splitlines() if line.startswith("summary:"))
            return round(int(summary.split()[1]) / queries)
    raise RuntimeError("no callgrind dump")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conc", type=int, default=1)
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gap", type=float, default=0.0)
    parser.add_argument("--busy", action="store_true", help="--gap spent running Python, not sleeping")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--floor", action="store_true")
    parser.add_argument("--profile")
    parser.add_argument("--script", action="store_true", help="bench (a)'s script query, parsed (Run), not relayed")
    parser.add_argument("--patch", default="pass", help="Python run in the worker before it starts (what-ifs)")
    parser.add_argument("--callgrind", help="run the worker under valgrind's callgrind, its output here: "
                        "instructions per query (user space only, deterministic)")
    args = parser.parse_args()
    ours, theirs = socket.socketpair()
    # as a zygote forks it: the runtime imported and frozen out of the collector first (engine/zygote.py)
    command = [sys.executable, "-c", "import gc, sys; from pyexec_connector.engine import worker; "
               f"{args.patch}; gc.freeze(); sys.argv[1:] = sys.argv[2:]; worker.main()", "-",
               str(theirs.fileno()), str(os.getpid())]
    if args.profile:
        command = [sys.executable, "-c", "import cProfile, gc, sys; sys.argv[1:] = sys.argv[2:]; "
                   f"from pyexec_connector.engine import worker; {args.patch}; gc.freeze(); "
                   f"cProfile.run('worker.main()', {args.profile!r})", "-", *command[-2:]]
    if args.floor:
        command = [sys.executable, os.path.join(os.path.dirname(__file__), "floor_process.py"), "worker",
                   str(theirs.fileno()), "token", "http://127.0.0.1:9"]
    if args.callgrind:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={args.callgrind}", "--dump-line=no",
                   *command]
    child = subprocess.Popen(command, pass_fds=(theirs.fileno(),))
    theirs.close()
    pipe = Pipe(ours, args.floor)
    gap = args.gap / 1e6
    if not args.floor:
        ours.sendall(wire.encode(messages.Init(settings(args.keep))))
        pipe.messages()        # Ready, Credit
    qid = run(pipe, args.conc, 2000, 1, gap, args.floor, script=args.script)      # warm
    figures = []
    if args.callgrind:
        subprocess.run(["callgrind_control", "--zero", str(child.pid)], check=True, capture_output=True)
        qid = run(pipe, args.conc, args.queries, qid, gap, args.floor, script=args.script)
        subprocess.run(["callgrind_control", "--dump", str(child.pid)], check=True, capture_output=True)
        args.rounds = 0
    for _ in range(args.rounds):
        cpu, (vol, invol), started = cpu_ns(child.pid), switches(child.pid), time.perf_counter()
        qid = run(pipe, args.conc, args.queries, qid, gap, args.floor, args.busy, args.script)
        elapsed = time.perf_counter() - started
        vol2, invol2 = switches(child.pid)
        n = args.queries
        figures.append(((cpu_ns(child.pid) - cpu) / n / 1000, (vol2 - vol) / n, (invol2 - invol) / n, n / elapsed))
    if args.floor:
        child.kill()
    else:
        ours.sendall(wire.encode(messages.Stop()))
    child.wait(10)
    if args.callgrind:
        print(json.dumps({"worker": "floor" if args.floor else "ours", "conc": args.conc, "keep": args.keep,
                          "script": args.script,
                          "instructions": instructions(args.callgrind, child.pid, args.queries)}))
        return
    cpus = [f[0] for f in figures]
    print(json.dumps({"worker": "floor" if args.floor else "ours", "conc": args.conc, "gap": args.gap,
                      "script": args.script,
                      "keep": args.keep, "cpu_us": round(statistics.median(cpus), 2),
                      "cpu_us_all": [round(c, 2) for c in cpus],
                      "vol_cs": round(statistics.median(f[1] for f in figures), 3),
                      "invol_cs": round(statistics.median(f[2] for f in figures), 3),
                      "qps": round(statistics.median(f[3] for f in figures))}))


if __name__ == "__main__":
    main()

"""engine/reaper.py's QueryProcesses as a worker drives it (issue 21): runs end, and once per turn of the
loop check() ends what they left running. Each scenario runs in a fresh interpreter, whose only children
are the ones it starts (QueryProcesses looks at every child of its process)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc and waitid(): Linux")


def run(body: str) -> None:
    script = textwrap.dedent("""\
        import asyncio, os, subprocess, time
        from pyexec_connector.engine.reaper import QueryProcesses

        def sleeper():
            return subprocess.Popen(["sleep", "60"], start_new_session=True, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)   # not on our pipes: run() would wait for it

        async def gone(proc, within=10.0):
            deadline = time.monotonic() + within
            while time.monotonic() < deadline:
                try:
                    with open(f"/proc/{proc.pid}/stat", "rb") as fp:
                        stat = fp.read()
                except OSError:
                    return True         # reaped (by the QueryProcesses: the Popen never waited)
                await asyncio.sleep(0.02)      # the reaping runs on this loop
            return False

        async def main():
            processes = QueryProcesses()
        """) + textwrap.indent(textwrap.dedent(body), "    ") + "\nasyncio.run(main())\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_runs_that_start_nothing_cost_a_check_that_finds_nothing_and_keep_no_record():
    run("""
        for qid in range(1, 101):
            processes.ended(qid, f"address-{qid}")
        assert len(processes.ended_runs) == 100
        assert not processes.check()
        assert processes.ended_runs == []
    """)


def test_what_runs_that_ended_in_one_turn_left_running_ends_at_the_check_counted_once():
    run("""
        processes.ended(1, "first")
        child = sleeper()               # started by the second run, which ends without a task
        processes.ended(2, "second")
        processes.ended(3, "third")
        assert processes.check() == [(3, "third", 1)]     # counted against the last run of the turn
        assert await gone(child), "the child of a run that ended outlived the check"
        assert not processes.check()
    """)


def test_a_process_started_while_a_task_run_goes_on_ends_with_that_run():
    run("""
        processes.started(7)            # a run that became a task: it spans turns
        child = sleeper()               # started by a run that ends in this turn
        processes.ended(8, "short")
        assert processes.check() == []          # held by run 7, which was running when it started
        await asyncio.sleep(1.5)
        assert child.poll() is None and os.path.exists(f"/proc/{child.pid}")
        processes.ended(7, "long")
        assert processes.check() == [(7, "long", 1)]
        assert await gone(child)
    """)


def test_keep_records_nothing():
    run("""
        processes.keep = True
        child = sleeper()
        processes.started(1)
        processes.ended(1, "kept")
        assert processes.ended_runs == []
        assert processes.end_all(grace=0.5) == 1        # the worker's end ends it
        assert await gone(child)
    """)

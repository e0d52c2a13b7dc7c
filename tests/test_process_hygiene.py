"""Every process a query starts ends with it (issue 21, docs/PROCESSES.md), through the real console command
and the stand-in server: user code starts a plain child and one in a session of its own (as daemons do),
and none of them is left after the query answers, after a timeout kill, after SIGTERM to the connector
or after SIGKILL to it; unless the source says keepChildProcesses."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from pyexec_connector.config import SourceConfig

from .conftest import SOURCE, TOKEN, console_command, free_port
from .test_operations import Proc, config_text, get, samples, value
from .test_sandbox import _console, _hardened, _stop, open_dir, root_only, worker_user  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="subreapers, parent-death signals and /proc: Linux")

# both kinds of children: one in the worker's process group, one that left it (setsid)
# (not on the connector's output: Proc.wait() would wait for them)
CHILDREN = ("import subprocess\n"
            "quiet = {'stdout': subprocess.DEVNULL, 'stderr': subprocess.DEVNULL}\n"
            "plain = subprocess.Popen(['sleep', '60'], **quiet).pid\n"
            "detached = subprocess.Popen(['sleep', '60'], start_new_session=True, **quiet).pid\n"
            "del quiet\n")
# the same, still running when the pids are known (a notification), until it is stopped
IN_FLIGHT = (CHILDREN + "import asyncio\n"
             "await connector_connection.send_notification({'pids': [plain, detached]})\n"
             "await asyncio.sleep(60)\n")


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie no longer runs; whoever reaps it is checked by `reaped`)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] != b"Z"


def is_dir(path: str) -> bool:
    return os.path.isdir(path)


def in_proc(pids: list[int]) -> list[int]:
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


async def reaped(pids: list[int], within: float = 15.0) -> list[int]:
    """The pids still in /proc (running, or zombies nobody reaped) after a bounded wait."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and in_proc(pids):
        await asyncio.sleep(0.05)
    return in_proc(pids)


@pytest.fixture
async def connector(server, tmp_path):
    """The console command in a session of its own, as a shell or systemd starts it."""
    procs: list[Proc] = []

    async def start(extra: dict | None = None, **general) -> Proc:
        server.set_source_config(SOURCE, {"workers": 1, **general})
        (tmp_path / "serverConfig").mkdir(exist_ok=True)
        (tmp_path / "serverConfig" / "server.config").write_text(config_text(server, TOKEN, **(extra or {})))
        (tmp_path / "serverConfig" / "server.config").chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTOR_")}
        process = await asyncio.create_subprocess_exec(
            *console_command(), cwd=tmp_path, env=env, start_new_session=True,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        proc = Proc(process)
        procs.append(proc)
        await server.wait_attached(SOURCE, timeout=60)
        return proc

    yield start
    for proc in procs:
        await proc.kill()


async def started_children(server) -> list[int]:
    """Send IN_FLIGHT; the pids of its two children once both run."""
    await server.send_query(SOURCE, {"code": IN_FLIGHT})
    notes = await server.wait_notifications(SOURCE, 1, timeout=60)
    pids = [int(pid) for pid in _pids(notes[-1])]
    assert all(running(pid) for pid in pids), pids
    return pids


def _pids(note: object) -> list[int]:
    if isinstance(note, dict):
        if "pids" in note:
            return list(note["pids"])
        for value_ in note.values():
            found = _pids(value_)
            if found:
                return found
    return []


async def test_nothing_a_query_started_survives_its_200(server, connector):
    port = free_port()
    proc = await connector({"metricsPort": port})
    result = await server.query({"code": CHILDREN}, SOURCE, timeout=60)
    assert result.status == 200, result.body
    pids = [result.results["plain"], result.results["detached"]]
    assert await reaped(pids) == [], "a child of the query outlived it"
    await proc.wait_for_line("ended with 2 processes it started still running")
    status, text = await get(port, "/metrics")
    assert status == 200
    assert value(samples(text), "pyexec_engine_query_processes_ended_total", source=SOURCE) == 2
    again = await server.query({"code": CHILDREN}, SOURCE, timeout=60)      # the same worker, again
    assert again.status == 200
    assert await reaped([again.results["plain"], again.results["detached"]]) == []


async def test_a_query_that_starts_nothing_logs_nothing(server, connector):
    proc = await connector()
    for _ in range(3):
        assert (await server.query({"code": "x = 1"}, SOURCE, timeout=60)).status == 200
    assert "still running" not in proc.output


async def test_keep_child_processes_keeps_them_until_the_worker_ends(server, connector):
    proc = await connector(keepChildProcesses=True)
    result = await server.query({"code": CHILDREN}, SOURCE, timeout=60)
    assert result.status == 200, result.body
    pids = [result.results["plain"], result.results["detached"]]
    await asyncio.sleep(3.0)                    # well past the grace a query's processes get
    assert all(running(pid) for pid in pids), "keepChildProcesses: they should still run"
    proc.signal(signal.SIGTERM)                 # their worker ends with the connector: so do they
    assert await proc.wait() == 0, proc.output
    assert await reaped(pids) == [], "a kept child outlived its worker"


# workers forked from a zygote, and spawned ones (a preload that fails leaves no zygote)
KINDS = pytest.mark.parametrize("preload", [(), ("no_such_module_here",)], ids=["forked", "spawned"])


@KINDS
async def test_nothing_survives_a_timeout_kill(server, connector, preload):
    await connector(executionTimeout=2, preload=list(preload))
    # the code blocks its worker (no await): the worker is killed, not just the query cancelled
    code = IN_FLIGHT.replace("await asyncio.sleep(60)", "import time\ntime.sleep(60)")
    address = await server.send_query(SOURCE, {"code": code})
    pids = [int(p) for p in _pids((await server.wait_notifications(SOURCE, 1, timeout=60))[-1])]
    result = await server.replies_for(address, timeout=60)
    assert result.status == 400 and "execution.timeout" in str(result.body)
    assert await reaped(pids) == [], "a child outlived its killed worker"
    again = await server.query({"code": "x = 1"}, SOURCE, timeout=60)
    assert again.status == 200


@KINDS
async def test_nothing_survives_a_worker_that_crashes(server, connector, preload):
    proc = await connector(preload=list(preload))
    await proc.wait_for_line("process hygiene")
    if preload and "without a cgroup" in proc.output:
        pytest.skip("spawned workers without a cgroup: the documented gap (docs/PROCESSES.md)")
    code = IN_FLIGHT.replace("await asyncio.sleep(60)", "await asyncio.sleep(0.5)\nos._exit(3)").replace(
        "import asyncio\n", "import asyncio, os\n")
    address = await server.send_query(SOURCE, {"code": code})
    pids = [int(p) for p in _pids((await server.wait_notifications(SOURCE, 1, timeout=60))[-1])]
    result = await server.replies_for(address, timeout=60)
    assert result.status == 400, result.body           # the worker died under the query
    assert await reaped(pids) == [], "a child outlived its crashed worker"


@KINDS
async def test_nothing_survives_sigterm_to_the_connector(server, connector, preload):
    proc = await connector({"shutdownGraceSeconds": 1}, preload=list(preload))
    pids = await started_children(server)
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0, proc.output
    assert await reaped(pids) == [], "a child outlived the connector's shutdown"


@KINDS
async def test_nothing_survives_sigkill_to_the_connector(server, connector, preload):
    proc = await connector(preload=list(preload))
    await proc.wait_for_line("process hygiene")
    if preload and "without a cgroup" in proc.output:
        pytest.skip("spawned workers without a cgroup: the documented gap (docs/PROCESSES.md)")
    pids = await started_children(server)
    proc.signal(signal.SIGKILL)
    await proc.wait()
    # no waitpid of ours can reach them: gone from /proc means reaped by a process of the connector's
    assert await reaped(pids) == [], "a child outlived the connector"


async def test_the_start_says_which_guarantee_holds_and_the_cgroup_goes_with_the_connector(server, connector):
    proc = await connector()
    await proc.wait_for_line("process hygiene")
    line = next(line for line in proc.lines if "process hygiene" in line)
    if "without a cgroup" in line:
        pytest.skip(f"no cgroup of its own here: {line}")
    path = line.split("run in the cgroup ", 1)[1].split(";", 1)[0]
    assert is_dir(path)
    result = await server.query({"code": "cgroup = open('/proc/self/cgroup').read()"}, SOURCE, timeout=60)
    assert path.endswith(result.results["cgroup"].strip().split("::", 1)[1]), "the worker is not in it"
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0
    assert not is_dir(path), "the connector's cgroup outlived it"


# 48 children that sleep 30 s, under maxProcessesPerWorker 50 (the zygote and the worker are the other two)
FORK_48 = ("import os, time\n"
           "children = []\n"
           "for _ in range(48):\n"
           "    pid = os.fork()\n"
           "    if pid == 0:\n"
           "        time.sleep(30)\n"
           "        os._exit(0)\n"
           "    children.append(pid)\n")


@root_only
async def test_hardened_forty_eight_children_end_with_their_query_and_the_next_can_fork(
        server, worker_user, open_dir):  # noqa: F811 - the fixtures of test_sandbox
    proc = await _hardened(server, open_dir, worker_user, {"workers": 1, "maxProcessesPerWorker": 50})
    try:
        first = await server.query({"code": FORK_48}, timeout=60)
        assert first.status == 200, first.body
        assert len(first.results["children"]) == 48
        assert await reaped(first.results["children"]) == [], "the fork bomb's children outlived their query"
        second = await server.query({"code": FORK_48}, timeout=60)       # the worker user's processes are free
        assert second.status == 200, second.body
        assert await reaped(second.results["children"]) == []
    finally:
        await _stop(proc)


async def test_a_process_started_beside_a_longer_query_ends_when_that_one_does(server, connector):
    """The rule for overlapping queries: a process belongs to every query running when it started."""
    await connector()
    long_address = await server.send_query(SOURCE, {"code": "import asyncio\n"
                                                            "await connector_connection.send_notification({})\n"
                                                            "await asyncio.sleep(4)\nx = 1"})
    await server.wait_notifications(SOURCE, 1, timeout=60)      # the long query runs
    short = await server.query({"code": CHILDREN}, SOURCE, timeout=60)
    assert short.status == 200
    pids = [short.results["plain"], short.results["detached"]]
    await asyncio.sleep(2.0)                    # past the grace its own query's end would have given them
    assert all(running(pid) for pid in pids), "ended while a query that overlapped their start still ran"
    assert (await server.replies_for(long_address, timeout=60)).status == 200
    assert await reaped(pids) == [], "outlived the last query that overlapped their start"


@root_only
async def test_without_a_cgroup_a_killed_connectors_zygote_ends_everything(server, open_dir):  # noqa: F811
    """A connector that is not root cannot have a cgroup here: it says so, starts, and the zygote alone
    ends what the queries started when the connector is SIGKILLed."""
    conf = open_dir / "serverConfig"
    conf.mkdir()
    conf.chmod(0o755)
    (conf / "server.config").write_text(config_text(server, TOKEN))
    (conf / "server.config").chmod(0o644)      # readable by the unprivileged connector (it warns)
    server.set_source_config(SOURCE, {"workers": 1})
    proc = Proc(await _console(open_dir, {}, user="nobody", readable_by="nobody"))
    try:
        await server.wait_attached(SOURCE, timeout=60)
        await proc.wait_for_line("process hygiene")
        assert "without a cgroup" in proc.output, proc.output
        pids = await started_children(server)
        proc.signal(signal.SIGKILL)
        await proc.wait()
        assert await reaped(pids) == [], "a child outlived the connector"
    finally:
        await proc.kill()


def test_keep_child_processes_is_a_boolean_named_when_wrong_and_changes_the_pool():
    config, problems = SourceConfig.parse({"keepChildProcesses": "maybe"})
    assert config is None and "keepChildProcesses" in problems
    kept, _ = SourceConfig.parse({"keepChildProcesses": True})
    assert kept is not None and kept.keepChildProcesses is True and SourceConfig().keepChildProcesses is False
    assert kept.pool_shape != SourceConfig().pool_shape       # its workers are started with it

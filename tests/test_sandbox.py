"""The worker boundary as a security boundary (docs/THREAT_MODEL.md): user code in a worker cannot
reach the token, the reconnect secret or the configuration file, through any of the vectors a curious
user would try; the hardened mode (workerUser) holds when the connector runs as root; the connector
still times out, kills and replaces such workers; a bounded fork bomb meets its limit and is answered."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from pyexec_connector import sandbox
from pyexec_connector.config import config_problems

from .conftest import SOURCE, TOKEN, console_command
from .test_zygote import gone

SECRET = "rsec-8d41c0b7a9e2"           # the reconnect secret: as secret as the token for this purpose
TEST_USER = "pyexec-sbx"               # a user of its own: RLIMIT_NPROC counts per user, machine-wide
TOKEN_SLICES = {TOKEN[i:i + 12] for i in range(len(TOKEN) - 11)}

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def leaks(text: str) -> list[str]:
    found = sorted(s for s in TOKEN_SLICES if s in text)
    return found + ([SECRET] if SECRET in text else [])


@pytest.fixture(scope="module")
def worker_user() -> str:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        if shutil.which("useradd") is None:
            pytest.skip("no useradd to create the test's worker user")
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                       check=True, capture_output=True, timeout=60)
    return TEST_USER


@pytest.fixture
def open_dir():
    """A directory every user can traverse (pytest's tmp_path is root's alone, which would stop the
    vectors for the wrong reason): what protects the files in it is their own mode."""
    path = Path(tempfile.mkdtemp(prefix="pyexec-sbx-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Every vector, tried as user code; each attempt's outcome (what was read, or the error) comes back.
VECTORS = r'''
import gc, hashlib, logging, os, sys
def attempt(f):
    try:
        value = f()
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
def _parent_of(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
parent = os.getppid()       # the zygote a worker was forked from, or the connector for a spawned one
ppid = parent               # the connector: above the zygote
while open(f"/proc/{ppid}/comm").read().strip() in ("pyexec-zygote", "pyexec-worker"):
    ppid = _parent_of(ppid)
ids = [os.getuid(), os.getgid(), os.getgroups()]
no_new_privs = open("/proc/self/status").read().split("NoNewPrivs:")[1].split()[0]
environment = dict(os.environ)
argv = [sys.argv, attempt(lambda: open("/proc/self/cmdline", "rb").read())]
parent_environ = attempt(lambda: open(f"/proc/{ppid}/environ", "rb").read())
parent_cmdline = attempt(lambda: open(f"/proc/{ppid}/cmdline", "rb").read())
parent_maps = attempt(lambda: open(f"/proc/{ppid}/maps").read()[:100000])
def read_mem():
    regions = [line.split()[0].split("-") for line in open(f"/proc/{ppid}/maps") if "[heap]" in line]
    start, end = (int(x, 16) for x in regions[0])
    with open(f"/proc/{ppid}/mem", "rb") as mem:
        mem.seek(start)
        return mem.read(min(end - start, 1 << 20))
parent_mem = attempt(read_mem)
def siblings():
    # the other workers of this connector (same parent: the zygote, or the connector)
    found = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                stat = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found[pid] = attempt(lambda: open(f"/proc/{pid}/mem", "rb").close() or "opened")
    return found
sibling_mem = siblings()
every_environ = {}
for pid in os.listdir("/proc"):
    if pid.isdigit():
        every_environ[pid] = attempt(lambda: open(f"/proc/{pid}/environ", "rb").read())
config_relative = attempt(lambda: open("serverConfig/server.config").read())
config_absolute = attempt(lambda: open(config_path).read())
config_by_cwd = attempt(lambda: open(f"/proc/{ppid}/cwd/serverConfig/server.config").read())
server_config = connector_connection.get_server_config()
connection = repr(vars(connector_connection)) + repr(vars(connector_connection.__class__))
loggers = repr([(name, vars(lg)) for name, lg in logging.root.manager.loggerDict.items()]) + repr(vars(logging.root))
handlers = repr([(vars(h), [vars(f) for f in h.filters]) for h in logging.root.handlers])
def sweep():
    # the markers are made here, not written out: this code's own text must not match
    markers = "-".join(["tok", "3f9a"]).encode(), "-".join(["rsec", "8d4"]).encode()
    found, seen = [], 0
    gc.unfreeze()   # a worker forked from the zygote inherits frozen objects, which get_objects() leaves out
    for obj in gc.get_objects():
        if obj is markers or obj is found:
            continue
        if isinstance(obj, dict):
            items = list(obj.items())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = [(None, x) for x in obj]
        elif hasattr(obj, "__dict__") and isinstance(getattr(obj, "__dict__", None), dict):
            items = list(vars(obj).items())
        else:
            continue
        for key, value in items:
            for text in (key, value):
                if isinstance(text, (str, bytes)):
                    seen += 1
                    raw = text.encode("utf-8", "replace") if isinstance(text, str) else text
                    if hashlib.sha256(raw).hexdigest() in wanted or any(m in raw for m in markers):
                        found.append(repr(text)[:200])
    return found, seen
found_in_memory, strings_seen = sweep()
'''


def _write_config(directory: Path, mode: int, **extra: str) -> Path:
    conf = directory / "serverConfig"
    conf.mkdir()
    conf.chmod(0o755)
    lines = [f"authToken = {TOKEN}", f"reconnectSecret = {SECRET}", *(f"{k} = {v}" for k, v in extra.items())]
    path = conf / "server.config"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(mode)
    return path


def _command_for(user: str | None) -> tuple[list[str], dict[str, str]]:
    """The console command, run by an interpreter that `user` can read. This suite's own may live where
    only root can read (pyenv under /root): then the system's python3.11, with the project's packages
    and source on PYTHONPATH (workerUser refuses an unreachable interpreter at start, which is what a
    test of the hardened mode would otherwise meet)."""
    if user is None:
        return console_command(), {}
    entry = pwd.getpwnam(user)
    if sandbox.unreachable_python(entry.pw_uid, entry.pw_gid) is None:
        return console_command(), {}
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.exists():
        pytest.skip(f"no interpreter {user} can read (this one: {sandbox.unreachable_python(entry.pw_uid, 0)})")
    paths = [sysconfig.get_paths()["purelib"], str(Path(sandbox.__file__).resolve().parent.parent)]
    for path in paths:      # a checkout under a folder only root may enter (e.g. /root): nothing to run
        if not _reachable(path, entry.pw_uid, entry.pw_gid):
            pytest.skip(f"{user} cannot reach {path}: clone the project where other users may read it")
    return [str(system), "-m", "pyexec_connector"], {"PYTHONPATH": os.pathsep.join(paths)}


def _reachable(path: str, uid: int, gid: int) -> bool:
    """Whether uid/gid may enter every folder on the way to `path` and read it (no supplementary groups)."""
    def may(st: os.stat_result, user_bit: int, group_bit: int, other_bit: int) -> bool:
        if st.st_uid == uid:
            return bool(st.st_mode & user_bit)
        if st.st_gid == gid:
            return bool(st.st_mode & group_bit)
        return bool(st.st_mode & other_bit)
    import stat
    real = Path(path).resolve()
    for step in [*reversed(real.parents), real]:
        st = step.stat()
        if not may(st, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            return False
    return may(real.stat(), stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)


async def _console(directory: Path, env_extra: dict[str, str], user: str | None = None,
                   readable_by: str | None = None):
    command, env_python = _command_for(readable_by or user)
    env = {**os.environ, **env_python, **env_extra}
    return await asyncio.create_subprocess_exec(*command, cwd=directory, env=env, user=user,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)


async def _stop(proc) -> str:
    if proc.returncode is None:
        proc.terminate()
    output, _ = await asyncio.wait_for(proc.communicate(), 30)
    return output.decode(errors="replace")


def _wanted() -> list[str]:
    return [hashlib.sha256(s.encode()).hexdigest() for s in (TOKEN, SECRET)]


@root_only
async def test_hardened_worker_user_code_finds_no_token_by_any_vector(server, worker_user, open_dir):
    """The real command as root, workerUser set, the token both in server.config (mode 600, as `check`
    asks) and in CONNECTOR_AUTH_TOKEN: every vector comes back empty or refused."""
    config = _write_config(open_dir, 0o600, targetServer=server.url, sources=SOURCE, workerUser=worker_user)
    server.set_source_config(SOURCE, {"workers": 1})
    proc = await _console(open_dir, {"CONNECTOR_AUTH_TOKEN": TOKEN, "CONNECTOR_RECONNECT_SECRET": SECRET},
                          readable_by=worker_user)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        seen = await server.query({"code": VECTORS, "presetValues": {"config_path": str(config),
                                                                     "wanted": _wanted()}}, timeout=60)
        assert seen.status == 200, seen.body
    finally:
        output = await _stop(proc)
    results = seen.results
    text = json.dumps(results)
    entry = pwd.getpwnam(worker_user)
    assert results["ids"] == [entry.pw_uid, entry.pw_gid, []], "not the worker user, or supplementary groups"
    assert results["no_new_privs"] == "1"
    assert results["strings_seen"] > 10_000, "the memory sweep saw too little to mean anything"
    for refused in ("parent_environ", "parent_mem", "config_relative", "config_absolute", "config_by_cwd"):
        assert results[refused].startswith("PermissionError"), (refused, results[refused][:200])
    assert results["found_in_memory"] == []
    assert not [k for k in results["environment"] if k.startswith("CONNECTOR_")]
    assert "reconnectSecret" not in results["server_config"] and "authToken" not in results["server_config"]
    assert leaks(text) == [], "user code reached a secret"
    assert leaks(output) == []


async def _hardened(server, directory: Path, worker_user: str, source_config: dict):
    _write_config(directory, 0o600, targetServer=server.url, sources=SOURCE, workerUser=worker_user)
    server.set_source_config(SOURCE, source_config)
    proc = await _console(directory, {}, readable_by=worker_user)
    await server.wait_attached(SOURCE, timeout=30)
    return proc


@root_only
async def test_hardened_workers_are_still_timed_out_killed_and_replaced(server, worker_user, open_dir):
    proc = await _hardened(server, open_dir, worker_user, {"workers": 1})
    try:
        first = await server.query({"code": "import os\npid = os.getpid()\nuid = os.getuid()"}, timeout=60)
        assert first.results["uid"] == pwd.getpwnam(worker_user).pw_uid
        stuck = await server.query({"code": "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                            "while True: pass", "timeout": 1}, timeout=30)
        assert stuck.status >= 400 and "timeout" in json.dumps(stuck.body).lower()
        after = await server.query({"code": "import os\npid = os.getpid()\nuid = os.getuid()"}, timeout=60)
        assert after.status == 200 and after.results["pid"] != first.results["pid"]
        # killed (after KILL_GRACE: the next query need not wait for that, a fork serves it) and reaped
        assert await gone(first.results["pid"]), "the stuck worker was left behind"
    finally:
        output = await _stop(proc)
    assert proc.returncode == 0, output


FORK_BOMB = r'''
import os, time
children = 0
try:
    for _ in range(300):                # bounded: at most 300 forks, each child gone within 3 s
        if os.fork() == 0:
            time.sleep(3)
            os._exit(0)
        children += 1
finally:
    marker = children
'''


@root_only
async def test_bounded_fork_bomb_meets_the_limit_and_the_next_query_is_served(server, worker_user, open_dir):
    proc = await _hardened(server, open_dir, worker_user, {"workers": 2, "maxProcessesPerWorker": 40})
    try:
        bomb = await server.query({"code": FORK_BOMB}, timeout=60)
        assert bomb.status == 400, bomb.body
        message = json.dumps(bomb.body)
        assert "maxProcessesPerWorker = 40" in message, message
        for n in range(4):          # both workers, while the bomb's children still live
            nxt = await server.query({"code": f"x = {n}"}, timeout=30)
            assert nxt.status == 200 and nxt.results == {"x": n}
    finally:
        output = await _stop(proc)
    assert proc.returncode == 0, output


async def test_max_open_files_is_named_when_reached(server, start_connector):
    server.set_source_config(SOURCE, {"workers": 1, "maxOpenFiles": 64})
    await start_connector()             # a per-process limit: it holds without workerUser too
    reply = await server.query({"code": "files = [open('/dev/null') for _ in range(200)]"}, timeout=30)
    assert reply.status == 400 and "maxOpenFiles = 64" in json.dumps(reply.body)
    assert (await server.query({"code": "x = 1"})).results == {"x": 1}


# ---- without workerUser ---------------------------------------------------------------------------------

async def test_default_mode_the_connector_is_not_dumpable_and_workers_hold_no_connector_variable(
        server, open_dir):
    """The connector and its workers as one ordinary user (nobody, when the suite runs as root): the
    token in CONNECTOR_AUTH_TOKEN stays out of the workers' environment, and the connector's
    /proc/<pid>/environ and mem, readable by its own user otherwise, are refused (non-dumpable). Where
    this stops: the config file by path, readable by that same user (docs/THREAT_MODEL.md)."""
    user = "nobody" if os.geteuid() == 0 else None
    conf = open_dir / "serverConfig"
    conf.mkdir()
    conf.chmod(0o755)
    (conf / "server.config").write_text(f"targetServer = {server.url}\nsources = {SOURCE}\n")
    (conf / "server.config").chmod(0o644)
    server.set_source_config(SOURCE, {"workers": 2, "minWorkers": 2})
    proc = await _console(open_dir, {"CONNECTOR_AUTH_TOKEN": TOKEN, "CONNECTOR_RECONNECT_SECRET": SECRET}, user)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        seen = await server.query({"code": VECTORS, "presetValues": {"config_path": "/nonexistent",
                                                                     "wanted": _wanted()}}, timeout=60)
        assert seen.status == 200, seen.body
    finally:
        output = await _stop(proc)
    results = seen.results
    assert results["ids"][0] == (os.getuid() if user is None else pwd.getpwnam(user).pw_uid)
    assert results["no_new_privs"] == "1"
    assert results["parent_environ"].startswith("PermissionError"), results["parent_environ"][:200]
    assert results["parent_mem"].startswith("PermissionError"), results["parent_mem"][:200]
    # the other worker, of the same user, is non-dumpable too: its memory (other queries' data) is refused
    assert len(results["sibling_mem"]) == 1 and all(v.startswith("PermissionError")
                                                    for v in results["sibling_mem"].values()), results["sibling_mem"]
    assert not [k for k in results["environment"] if k.startswith("CONNECTOR_")]
    assert results["found_in_memory"] == []
    assert leaks(json.dumps(results)) == []
    assert leaks(output) == []


def test_the_connector_makes_itself_non_dumpable():
    """The console command, any sub-command: `check` reads the token too."""
    probe = ("import sys; from pyexec_connector import cli, sandbox\n"
             "sys.argv = ['pyexec-connector', '--version']\n"
             "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
             "print('dumpable', sandbox.is_dumpable())\n")
    out = subprocess.run([sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=60)
    assert "dumpable False" in out.stdout, out


# ---- configuration ---------------------------------------------------------------------------------------

def test_worker_user_problems_name_the_key_and_where_it_came_from():
    base = {"targetServer": "http://127.0.0.1:1", "authToken": "t" * 20, "sources": "s"}
    _, problems = config_problems({**base, "workerUser": "no-such-user-xyz"}, env={}, file="server.config")
    assert [p.key for p in problems] == ["workerUser"] and "no-such-user-xyz" in str(problems[0])
    assert "server.config" in str(problems[0])
    _, problems = config_problems(base, env={"CONNECTOR_WORKER_USER": "root", "CONNECTOR_WORKER_GROUP": "x-none"},
                                  file="server.config")
    assert {p.key for p in problems} >= {"workerUser"}
    assert "CONNECTOR_WORKER_USER" in str(next(p for p in problems if p.key == "workerUser"))
    _, problems = config_problems({**base, "workerGroup": "nogroup", "maxMessageBytes": "1"}, env={}, file="f")
    assert {p.key for p in problems} == {"workerGroup", "maxMessageBytes"}     # every problem at once


async def test_worker_user_without_the_privilege_to_switch_is_a_start_up_error(open_dir):
    if os.geteuid() != 0:
        user = None
    else:
        user = "nobody"
    conf = open_dir / "serverConfig"
    conf.mkdir()
    conf.chmod(0o755)
    (conf / "server.config").write_text("targetServer = http://127.0.0.1:9\nauthToken = xxxxxxxxxxxxxxxx\n"
                                        f"sources = {SOURCE}\nworkerUser = daemon\n")
    (conf / "server.config").chmod(0o644)
    proc = await _console(open_dir, {}, user)
    output = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert proc.returncode == 2, output
    assert "workerUser" in output and "SETUID" in output, output


def test_worker_environment_keeps_no_connector_variable():
    env = sandbox.worker_environment(None, {"CONNECTOR_AUTH_TOKEN": TOKEN, "CONNECTOR_RECONNECT_SECRET": SECRET,
                                            "CONNECTOR_SOURCES": "s", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}


# ---- check ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "worker", "warned"), [
    (0o644, False, "every user of this machine"),
    (0o644, True, "the worker user"),
    (0o640, True, None),        # group root: not the worker's
    (0o600, False, None),
])
def test_check_warns_when_the_token_file_is_readable_by_workers_or_everyone(open_dir, mode, worker, warned):
    if worker and os.geteuid() != 0:
        pytest.skip("workerUser needs root")
    extra = {"workerUser": "nobody"} if worker else {}
    _write_config(open_dir, mode, targetServer="http://127.0.0.1:9", sources=SOURCE, **extra)
    command, env = _command_for("nobody" if worker else None)
    out = subprocess.run([*command, "check", "--timeout", "2"], cwd=open_dir, capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.startswith("warning:")]
    if warned is None:
        assert lines == [], out.stdout
    else:
        assert len(lines) == 1 and warned in lines[0] and "chmod 600" in lines[0], out.stdout
        assert "CONNECTOR_AUTH_TOKEN" in lines[0]
    assert leaks(out.stdout + out.stderr) == []


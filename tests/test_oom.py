"""A worker's SIGKILL is blamed on the out-of-memory killer only when the kernel's OOM kill count rose."""
import pytest

from pyexec_connector import errors
from pyexec_connector.engine.oom import OomWitness, oom_kill_count, sigkill_hint

from .conftest import SOURCE


@pytest.mark.parametrize("code", ["import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
                                  "import os, signal, subprocess\n"
                                  "subprocess.run(['kill', '-9', str(os.getpid())])"])
async def test_a_worker_that_sigkills_itself_is_not_blamed_on_memory(server, start_connector, code):
    server.set_source_config(SOURCE, {"workers": 1})
    await start_connector()
    result = await server.query({"code": code})
    assert result.status == 400 and result.error_code == errors.WORKER_DIED
    (what,) = result.body["parameters"]
    assert "killed by signal SIGKILL (9)" in what and "memory" not in what, what
    assert (await server.query({"code": "alive = True"})).results == {"alive": True}


def test_the_hint_follows_the_kernels_count():
    counts = iter([3, 3, 4, 6, 6, 6])
    witness = OomWitness(lambda: next(counts))          # made at 3
    assert sigkill_hint(witness) == ""                  # 3: no OOM kill since
    assert "out-of-memory" in sigkill_hint(witness)     # 4: one
    assert "out-of-memory" in sigkill_hint(witness)     # 6: two at once explain two deaths...
    assert "out-of-memory" in sigkill_hint(witness)
    assert sigkill_hint(witness) == ""                  # ...not a third


def test_no_count_no_hint():
    assert sigkill_hint(OomWitness(lambda: None)) == ""


def _fake(tmp_path, cgroup_line, files):
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup_line)
    (proc / "vmstat").write_text("nr_free_pages 1\noom_kill 9\n")
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return proc, root


@pytest.mark.parametrize("cgroup_line, files, expected", [
    ("0::/a/b\n", {"a/b/memory.events": "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n"}, 2),          # v2
    ("0::/a/b\n", {"memory.events": "oom 1\noom_kill 1\n"}, 1),            # v2, the cgroup mounted as root
    ("4:memory:/x\n1:cpu:/\n", {"memory/x/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n"}, 5),
    ("4:memory:/x\n", {}, 9),                                              # nothing readable: the system's
])
def test_where_the_count_is_read(tmp_path, cgroup_line, files, expected):
    proc, root = _fake(tmp_path, cgroup_line, files)
    assert oom_kill_count(proc, root) == expected


def test_this_machine_has_a_count_or_none():
    count = oom_kill_count()
    assert count is None or count >= 0

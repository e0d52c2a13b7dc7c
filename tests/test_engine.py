"""The execution engines through the real connector and devserver.py: isolation, limits, new WITH powers."""
import asyncio
import time

import pytest

from pyexec_connector import errors
from pyexec_connector.engine import EngineStats

from .conftest import SOURCE

RUNAWAY = "while True:\n    pass"
SLOW = "import asyncio\nawait asyncio.sleep(delay)\ndone = True"


async def start(server, start_connector, **general):
    server.set_source_config(SOURCE, general)
    return await start_connector()


async def wait_for(predicate, timeout=10.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def stats(running):
    return running.session.engine.stats()


async def test_runaway_loop_times_out_and_the_worker_is_replaced(server, start_connector):
    running = await start(server, start_connector, workers=2, minWorkers=2)
    began = time.monotonic()
    runaway = await server.send_query(SOURCE, {"code": RUNAWAY, "timeout": 1})
    other = await server.query({"code": "import asyncio\nawait asyncio.sleep(0.3)\nok = 1"})
    assert other.results == {"ok": 1}
    result = await server.replies_for(runaway)
    assert time.monotonic() - began < 5
    assert result.error_code == errors.TIMEOUT and result.body["parameters"] == [1.0]
    await wait_for(lambda: stats(running).worker_restarts >= 1 and stats(running).workers_alive == 2)
    assert stats(running).timeouts == 1
    assert (await server.query({"code": "again = 2"})).results == {"again": 2}


async def test_execution_timeout_from_source_config(server, start_connector):
    await start(server, start_connector, workers=1, executionTimeout=0.5)
    result = await server.query({"code": RUNAWAY})
    assert result.error_code == errors.TIMEOUT and result.body["parameters"] == [0.5]
    # the WITH parameter overrides the source default
    assert (await server.query({"code": SLOW, "presetValues": {"delay": 0.8}, "timeout": 5})).results["done"]


@pytest.mark.parametrize("code, expected", [
    ("import os\nos._exit(7)", "exit code 7"),
    ("import ctypes\nctypes.string_at(0)", "SIGSEGV"),
    ("import asyncio, sys\nasync def bye():\n    sys.exit(4)\nasyncio.get_event_loop().create_task(bye())\n"
     "await asyncio.sleep(1)", "exit code 4"),
])
async def test_worker_death_is_answered_and_the_next_query_served(server, start_connector, code, expected):
    running = await start(server, start_connector, workers=2, minWorkers=2)
    result = await server.query({"code": code})
    assert result.status == 400 and result.error_code == errors.WORKER_DIED
    assert expected in result.body["parameters"][0]
    assert (await server.query({"code": "alive = True"})).results == {"alive": True}
    await wait_for(lambda: stats(running).worker_restarts == 1 and stats(running).workers_alive == 2)


async def test_worker_death_leaves_queries_on_other_workers_alone(server, start_connector):
    await start(server, start_connector, workers=2, minWorkers=2)
    slow = await server.send_query(SOURCE, {"code": SLOW, "presetValues": {"delay": 0.5}})
    await asyncio.sleep(0.1)
    assert (await server.query({"code": "import os\nos._exit(1)"})).error_code == errors.WORKER_DIED
    assert (await server.replies_for(slow)).results == {"delay": 0.5, "done": True}


async def test_memory_limit_is_a_reply(server, start_connector):
    await start(server, start_connector, workers=1, memoryLimitMB=400)
    result = await server.query({"code": "hog = bytearray(2 * 1024 ** 3)"})
    assert result.status == 400 and result.error_code == errors.MEMORY_LIMIT
    assert (await server.query({"code": "small = len(bytearray(10 ** 6))"})).results == {"small": 10 ** 6}


async def test_cpu_bound_queries_run_in_parallel_and_do_not_block_the_connector(server, start_connector):
    await start(server, start_connector, workers=2, minWorkers=2)
    # Each run reports its own wall-clock span: the machine is shared and noisy, so the pair is compared
    # with the runs' own durations under the same load, not with a run measured at another moment.
    spin = ("import os, time\nbegan = time.time()\nend = time.process_time() + seconds\n"
            "while time.process_time() < end:\n    pass\nended = time.time()\npid = os.getpid()\nfinished = True")
    params = {"code": spin, "name": "spin", "presetValues": {"seconds": 0.7},
              "limitReturnTo": ["finished", "began", "ended", "pid"]}
    await server.query({"code": "warm = 1"})
    began = time.monotonic()
    first = await server.send_query(SOURCE, params)
    second = await server.send_query(SOURCE, params)
    a = (await server.replies_for(first, timeout=30)).results
    b = (await server.replies_for(second, timeout=30)).results
    together = time.monotonic() - began
    assert a["pid"] != b["pid"]
    one_after_another = (a["ended"] - a["began"]) + (b["ended"] - b["began"])
    assert together < 0.8 * one_after_another, (together, one_after_another)
    assert max(a["began"], b["began"]) < min(a["ended"], b["ended"])      # they overlapped

    # a trivial query sent after a long CPU-bound one (on the other worker) is answered first
    long_one = await server.send_query(SOURCE, dict(params, presetValues={"seconds": 1.5}))
    await asyncio.sleep(0.2)
    trivial = await server.send_query(SOURCE, {"code": "quick = 1"})
    assert (await server.replies_for(trivial)).results == {"quick": 1}
    assert server.received(long_one) == 0       # still running
    assert (await server.replies_for(long_one, timeout=30)).results["finished"] is True


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_captured_output_is_each_runs_own(server, start_connector, mode):
    await start(server, start_connector, executionMode=mode, workers=1)
    code = ("import asyncio, sys\n"
            "async def err():\n    print(f'{tag} from a task', file=sys.stderr)\n"
            "for i in range(5):\n    print(tag, i)\n    await asyncio.sleep(0.01)\n"
            "await asyncio.get_event_loop().create_task(err())")
    tags = [f"run{n}" for n in range(6)]
    addresses = [await server.send_query(SOURCE, {"code": code, "name": "printer", "captureOutput": True,
                                                  "presetValues": {"tag": tag}}) for tag in tags]
    for tag, address in zip(tags, addresses, strict=True):
        body = (await server.replies_for(address)).body
        assert body["pythonOutput"] == {"stdout": "".join(f"{tag} {i}\n" for i in range(5)),
                                        "stderr": f"{tag} from a task\n"}
    assert "pythonOutput" not in (await server.query({"code": "print('not asked')"})).body


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_code_guard_lists_every_violation_and_nothing_runs(server, start_connector, mode):
    await start(server, start_connector, executionMode=mode, workers=1,
                codeGuard={"forbid": ["open", "eval", "os.system", "subprocess"]})
    code = ("await connector_connection.send_notification({'ran': True})\n"
            "import os as o\n"
            "o.system('true')\n"
            "from subprocess import run\n"
            "data = open('/etc/passwd').read()\n"
            "path = o.path.join('a', 'b')\n"
            "value = eval('1 + 1')\n")
    result = await server.query({"code": code, "name": "bad.py"})
    assert result.status == 400 and result.error_code == errors.GUARD_VIOLATION
    filename, listing, found = result.body["parameters"]
    assert filename == "bad.py"
    assert [(v["line"], v["use"]) for v in found] == [(3, "os.system"), (4, "import subprocess"), (5, "open"),
                                                     (7, "eval")]
    assert "line 3: os.system" in listing
    allowed = await server.query({"code": "import os\npath = os.path.join('a', 'b')"})
    assert allowed.results == {"path": "a/b"}
    await asyncio.sleep(0.1)
    assert server.notifications[SOURCE] == []


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_dry_run_compiles_and_guards_only(server, start_connector, mode):
    await start(server, start_connector, executionMode=mode, codeGuard={"forbid": ["eval"]})
    code = "await connector_connection.send_notification({'ran': True})\nx = 1"
    result = await server.query({"code": code, "name": "dry.py", "dryRun": True})
    assert result.status == 200
    assert result.body["pythonCallResults"] == {}
    report = result.body["dryRun"]
    assert report["name"] == "dry.py" and report["compiled"] is True and report["codeGuard"] == "passed"
    assert (await server.query({"code": "x = (", "dryRun": True})).error_code == errors.SYNTAX_ERROR
    assert (await server.query({"code": "eval('1')", "dryRun": "true"})).error_code == errors.GUARD_VIOLATION
    assert (await server.query({"code": code, "dryRun": True, "codeHandlesReturn": True})).status == 200
    # a dry run does not cache
    assert (await server.query({"name": "dry.py"})).error_code == errors.NO_CACHE
    await asyncio.sleep(0.1)
    assert server.notifications[SOURCE] == []


async def test_busy_beyond_the_queue(server, start_connector):
    running = await start(server, start_connector, workers=1, queriesPerWorker=1, maxQueuedQueries=1)
    params = {"code": SLOW, "presetValues": {"delay": 1.0}}
    first = await server.send_query(SOURCE, params)
    await asyncio.sleep(0.2)
    second = await server.send_query(SOURCE, params)
    await wait_for(lambda: stats(running).queue_depth == 1)
    busy = await server.query(params)
    assert busy.status == 400 and busy.error_code == errors.BUSY
    assert server.received(first) == 0          # answered at once, while the first still runs
    assert (await server.replies_for(first)).results["done"] is True
    assert (await server.replies_for(second)).results["done"] is True


STREAM_THEN_STALL = (
    "import asyncio\n"
    "async def go():\n"
    "    await connector_connection.send_query_response(connector_context, 100, {'part': 1})\n"
    "    await asyncio.sleep(1.0)\n"
    "    await connector_connection.send_query_response(connector_context, 200, {'part': 2})\n"
    "asyncio.get_event_loop().create_task(go())")


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_code_handles_return_timeout_drops_later_replies(server, start_connector, mode, caplog):
    running = await start(server, start_connector, executionMode=mode, workers=1)
    result = await server.query({"code": STREAM_THEN_STALL, "codeHandlesReturn": True, "timeout": 0.4})
    assert [r["status"] for r in result.replies] == [100, 400]
    assert result.error_code == errors.TIMEOUT
    await asyncio.sleep(1.0)
    assert server.stray_replies == []
    assert stats(running).timeouts == 1 and stats(running).worker_restarts == 0
    assert (await server.query({"code": "fine = 1"})).results == {"fine": 1}


async def test_inline_timeout_for_awaiting_code(server, start_connector):
    await start(server, start_connector, executionMode="inline")
    result = await server.query({"code": SLOW, "presetValues": {"delay": 5}, "timeout": 0.3})
    assert result.error_code == errors.TIMEOUT


async def test_module_state_persists_per_worker(server, start_connector):
    await start(server, start_connector, workers=1)
    code = "import json\njson.loaded_times = getattr(json, 'loaded_times', 0) + 1\nn = json.loaded_times"
    assert (await server.query({"code": code})).results == {"n": 1}
    assert (await server.query({"code": code})).results == {"n": 2}


async def test_health_declared_in_a_worker_reaches_the_connector(server, start_connector):
    running = await start(server, start_connector, workers=2, minWorkers=2)
    await server.query({"code": "await connector_connection.declare_unhealthy()"})
    assert running.connector.health.declared is False
    # the other worker sees it too
    results = [(await server.query({"code": "h = connector_connection.is_healthy()", "name": f"h{n}"})).results
               for n in range(2)]
    assert results == [{"h": False}, {"h": False}]


async def test_close_answers_queries_in_flight(server, start_connector):
    running = await start(server, start_connector, workers=1)
    address = await server.send_query(SOURCE, {"code": RUNAWAY})
    await asyncio.sleep(0.3)
    await running.stop()
    result = await server.replies_for(address)
    assert result.error_code == errors.SHUTTING_DOWN


async def test_reconfigure_to_a_new_pool_answers_queries_in_flight(server, start_connector):
    running = await start(server, start_connector, workers=1)
    old_engine = running.session.engine
    slow = await server.send_query(SOURCE, {"code": SLOW, "presetValues": {"delay": 0.5}})
    await asyncio.sleep(0.2)
    await server.reconfigure(SOURCE, {"workers": 2, "minWorkers": 2})
    assert (await server.replies_for(slow)).results["done"] is True
    assert (await server.query({"code": "new = 1"})).results == {"new": 1}
    assert running.session.engine is not old_engine
    await wait_for(lambda: old_engine.stats().workers_alive == 0)
    await server.reconfigure(SOURCE, {"executionMode": "inline"})
    assert (await server.query({"code": "inline = 1"})).results == {"inline": 1}
    assert running.session.engine.stats().workers_alive is None      # inline: no workers


async def test_reconfigure_same_shape_keeps_workers(server, start_connector):
    running = await start(server, start_connector, workers=1)
    code = "import json\njson.seen = getattr(json, 'seen', 0) + 1\nn = json.seen"
    await server.query({"code": code})
    engine = running.session.engine
    await server.reconfigure(SOURCE, {"workers": 1, "codeCacheSize": 7})
    await asyncio.sleep(0.1)
    assert running.session.engine is engine
    assert (await server.query({"code": code})).results == {"n": 2}


async def test_workers_do_not_see_the_token(server, start_connector, monkeypatch):
    monkeypatch.setenv("CONNECTOR_AUTH_TOKEN", "secret-in-the-environment")
    await start(server, start_connector, workers=1)
    result = await server.query({"code": "import os\nseen = os.environ.get('CONNECTOR_AUTH_TOKEN')"})
    assert result.results == {"seen": None}


async def test_inline_stats_report_no_pool_and_its_cache(server, start_connector):
    running = await start(server, start_connector, executionMode="inline")
    assert (await server.query({"code": "x = 1", "name": "once"})).status == 200
    assert (await server.query({"name": "once"})).status == 200
    figures = stats(running)
    assert isinstance(figures, EngineStats) and figures.can_run
    assert figures.workers_alive is None and figures.queue_depth is None and figures.worker_recycles is None
    assert (figures.cache_hits, figures.cache_misses, figures.cache_size) == (1, 1, 1)


async def test_name_only_query_runs_on_a_worker_that_never_saw_the_code(server, start_connector):
    await start(server, start_connector, workers=2, minWorkers=2, returnRuntimeInformation=True)
    first = await server.query({"code": "import os\npid = os.getpid()", "name": "cached"})
    assert first.body["connectorRuntimeInfo"]["newCacheEntry"] is True
    # holds worker 0 in synchronous code: the name goes to the other worker, not to the one that compiled it
    slow = await server.send_query(SOURCE, {"code": "import time\ntime.sleep(delay)\ndone = True",
                                            "presetValues": {"delay": 0.5}})
    await asyncio.sleep(0.1)
    second = await server.query({"name": "cached"})
    assert second.results["pid"] != first.results["pid"]
    assert second.body["connectorRuntimeInfo"]["using_cached"] is False      # compiled there from the text
    await server.replies_for(slow)


async def test_a_crafted_message_from_user_code_runs_nothing_in_the_connector(server, start_connector, tmp_path):
    await start(server, start_connector, workers=1)
    marker = tmp_path / "pwned"
    code = ("import os, pickle, struct, sys\n"
            "class Evil:\n"
            "    def __reduce__(self):\n"
            "        return (os.system, ('touch ' + marker,))\n"
            "data = pickle.dumps(('done', 1, Evil()))\n"
            "os.write(int(sys.argv[1]), struct.pack('!I', len(data)) + data)\n"
            "import time\ntime.sleep(1)")
    result = await server.query({"code": code, "presetValues": {"marker": str(marker)}})
    assert result.error_code == errors.WORKER_DIED and "malformed" in result.body["parameters"][0]
    assert not marker.exists()
    assert (await server.query({"code": "ok = 1"})).results == {"ok": 1}

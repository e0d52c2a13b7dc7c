"""Flow control on the link: the outbox is bounded in bytes (maxPendingBytes), code sending replies
waits while it is full, and everything arrives in order once the server reads again."""
import asyncio
import contextlib
import json

import psutil
import pytest

from pyexec_connector.config import DEFAULT_MAX_PENDING_BYTES, build_server_config
from pyexec_connector.errors import ConfigError

from .conftest import SOURCE, TOKEN, console_command

STREAM = """
big = "x" * size
for i in range(count):
    await connector_connection.send_query_response(connector_context, 100, {"i": i, "data": big})
    if progress:
        with open(progress, "a") as f:
            f.write(".")
await connector_connection.send_query_response(connector_context, 200, {"i": count})
"""


def _props(**changes):
    props = {"targetServer": "https://x.example", "authToken": TOKEN, "sources": SOURCE}
    props.update(changes)
    return props


def test_max_pending_bytes_is_parsed_and_checked():
    assert build_server_config(_props(), env={}).max_pending_bytes == DEFAULT_MAX_PENDING_BYTES
    assert build_server_config(_props(maxPendingBytes="1048576"), env={}).max_pending_bytes == 1 << 20
    for bad in ("lots", "100", "-1"):
        with pytest.raises(ConfigError) as info:
            build_server_config(_props(maxPendingBytes=bad), env={}, file="x/server.config")
        assert info.value.key == "maxPendingBytes" and "maxPendingBytes" in str(info.value)


async def test_devserver_pause_reading_holds_replies_until_resumed(connected):
    server, _ = connected
    server.pause_reading()
    assert not server.reading
    address = await server.send_query(SOURCE, {"code": "x = 1"})
    with pytest.raises(TimeoutError):
        await server.replies_for(address, timeout=1.0)
    server.resume_reading()
    result = await server.replies_for(address, timeout=10)
    assert result.status == 200 and result.results["x"] == 1


async def _collect(server, params):
    """Send a query; returns (indexes of its replies in arrival order, future of its terminal status).
    Only the index of each reply is kept: the test process must not hold the stream itself."""
    address = f"stream-{id(params)}"
    seen: list[int] = []
    done = asyncio.get_running_loop().create_future()

    def sink(frame):
        seen.append(frame["body"]["i"])
        if frame["status"] != 100 and not done.done():
            done.set_result(frame["status"])

    server.route_replies(address, sink)
    await server.send_frame(SOURCE, {"op": "query", "resourceName": "sources", "resourceId": SOURCE,
                                     "object": params, "messageHeaders": {"REPLY_ADDR_HEADER": address}})
    return seen, done


async def test_send_query_response_waits_while_the_outbox_is_full(server, start_connector, tmp_path):
    server.set_source_config(SOURCE, {"executionMode": "inline"})
    limit = 1 << 20
    running = await start_connector(maxPendingBytes=limit)
    link = running.session.link
    frame = 256 * 1024
    progress = tmp_path / "progress"
    server.pause_reading()
    seen, done = await _collect(server, {"code": STREAM, "presetValues": {
        "size": frame, "count": 200, "progress": str(progress)}})
    await asyncio.sleep(3)      # the code sends what the socket and the outbox take, then waits
    sent = len(progress.read_text())
    assert 0 < sent < 200 and not done.done()
    assert link.pending_bytes <= limit + 2 * frame
    assert link.peak_pending_bytes <= limit + 2 * frame
    server.resume_reading()
    assert await asyncio.wait_for(done, 60) == 200
    assert seen == list(range(201))          # every partial reply, in order, then the last
    assert len(progress.read_text()) == 200


async def test_a_paused_server_keeps_the_connector_small_and_loses_nothing(tmp_path, server):
    """The console command in inline mode streams 150 replies of 4 MB while the server stops reading:
    its memory stays bounded (it held them all before: 600 MB), and all arrive in order after."""
    server.set_source_config(SOURCE, {"executionMode": "inline"})
    (tmp_path / "serverConfig").mkdir()
    (tmp_path / "serverConfig" / "server.config").write_text(
        f"targetServer = {server.url}\nauthToken = {TOKEN}\nsources = {SOURCE}\n")
    proc = await asyncio.create_subprocess_exec(*console_command(), cwd=tmp_path,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await server.wait_attached(SOURCE, timeout=30)
        connector = psutil.Process(proc.pid)
        server.pause_reading()
        seen, done = await _collect(server, {"code": STREAM, "presetValues": {
            "size": 4 << 20, "count": 150, "progress": ""}})
        peak = 0
        for _ in range(40):         # 8 s paused
            peak = max(peak, connector.memory_info().rss)
            await asyncio.sleep(0.2)
        assert not done.done()
        server.resume_reading()
        assert await asyncio.wait_for(done, 120) == 200
        assert seen == list(range(151))
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
    assert peak < 300 * 2 ** 20, f"connector RSS reached {peak / 2 ** 20:.0f} MB while the server was paused"


async def test_notifications_wait_too_and_arrive_in_order(server, start_connector):
    server.set_source_config(SOURCE, {"executionMode": "inline"})
    limit = 1 << 20
    running = await start_connector(maxPendingBytes=limit)
    link = running.session.link
    code = """
big = "y" * 200_000
for i in range(150):
    await connector_connection.send_notification({"i": i, "data": big})
x = 1
"""
    server.pause_reading()
    address = await server.send_query(SOURCE, {"code": code})
    await asyncio.sleep(2)
    assert link.peak_pending_bytes <= limit + 2 * 200_000
    server.resume_reading()
    assert (await server.replies_for(address, timeout=60)).results["x"] == 1
    notes = await server.wait_notifications(SOURCE, 150, timeout=60)
    assert [n["i"] for n in notes] == list(range(150))
    assert json.dumps(notes[0]).count("y") == 200_000


async def test_process_mode_replies_are_read_from_workers_only_as_fast_as_the_link_drains(server, start_connector):
    """Partial replies streamed by a worker and plain replies of many queries: the connector reads the
    worker pipes only while the outbox has room, so a paused server cannot make it hold them all."""
    server.set_source_config(SOURCE, {"workers": 2})
    limit = 1 << 20
    running = await start_connector(maxPendingBytes=limit)
    link = running.session.link
    frame = 256 * 1024
    server.pause_reading()
    seen, done = await _collect(server, {"code": STREAM, "presetValues": {
        "size": frame, "count": 100, "progress": ""}})
    plain = [await server.send_query(SOURCE, {"code": "data = 'z' * 262144; i = n", "presetValues": {"n": n}})
             for n in range(40)]
    await asyncio.sleep(3)
    assert not done.done()
    assert link.peak_pending_bytes <= limit + 4 * frame, link.peak_pending_bytes
    server.resume_reading()
    assert await asyncio.wait_for(done, 60) == 200
    assert seen == list(range(101))
    for n, address in enumerate(plain):
        result = await server.replies_for(address, timeout=60)
        assert result.status == 200 and result.results["i"] == n


async def test_metrics_show_the_outbox_and_the_senders_that_waited(server, start_connector):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape(connector):
        text = connector.metrics.exposition().decode()
        return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
                if s.labels.get("source", SOURCE) == SOURCE}

    server.set_source_config(SOURCE, {"executionMode": "inline"})
    running = await start_connector(maxPendingBytes=1 << 20)
    before = scrape(running.connector)
    assert before["pyexec_link_pending_bytes"] == 0 and before["pyexec_link_sender_waits_total"] == 0
    server.pause_reading()
    seen, done = await _collect(server, {"code": STREAM, "presetValues": {
        "size": 256 * 1024, "count": 100, "progress": ""}})
    await asyncio.sleep(2)
    during = scrape(running.connector)
    assert during["pyexec_link_pending_bytes"] > 0 and during["pyexec_link_sender_waits_total"] >= 1
    server.resume_reading()
    assert await asyncio.wait_for(done, 60) == 200
    assert scrape(running.connector)["pyexec_link_pending_bytes"] == 0


async def test_replies_made_while_the_link_is_down_wait_for_it_and_arrive_in_order(server, start_connector,
                                                                                  tmp_path):
    server.set_source_config(SOURCE, {"executionMode": "inline"})
    limit = 1 << 20
    running = await start_connector(maxPendingBytes=limit)
    link = running.session.link
    progress = tmp_path / "progress"
    seen, done = await _collect(server, {"code": "import asyncio\nawait asyncio.sleep(1)\n" + STREAM,
                                         "presetValues": {"size": 256 * 1024, "count": 60,
                                                          "progress": str(progress)}})
    server.refuse(SOURCE, 409, "io.vantiq.source.already.served", "Someone else serves {0}.")
    await server.drop(SOURCE)       # down while the code sleeps; it stays down while refused
    await asyncio.sleep(3)
    sent = len(progress.read_text())
    assert 0 < sent < 60 and not done.done()     # the outbox filled up, and the code waits
    assert link.pending_bytes <= limit + 2 * 256 * 1024
    server.accept(SOURCE)
    assert await asyncio.wait_for(done, 60) == 200
    assert seen == list(range(61))


# ---- process mode: the worker's awaited sends wait for the connector (Accepted) ---------------------

async def test_a_workers_awaited_send_returns_only_once_the_connector_accepted_it(server, start_connector,
                                                                                  tmp_path):
    """A worker's code can be ahead of what the connector took into the link's outbox by at most the
    accept window (worker.ACCEPT_WINDOW), not by whatever the pipe and the connector's reader buffer."""
    from pyexec_connector.engine.messages import ACCEPT_WINDOW

    server.set_source_config(SOURCE, {"workers": 1})
    running = await start_connector(maxPendingBytes=1 << 20)
    engine = running.session.engine
    frame, count = 64 * 1024, 400
    progress = tmp_path / "progress"
    progress.write_text("")
    server.pause_reading()
    seen, done = await _collect(server, {"code": STREAM, "presetValues": {
        "size": frame, "count": count, "progress": str(progress)}})
    ahead = 0
    for _ in range(20):         # 4 s paused
        await asyncio.sleep(0.2)
        ahead = max(ahead, len(progress.read_text()) - engine.stats().accepted_frames)
    sent = len(progress.read_text())
    assert 0 < sent < count and not done.done()
    assert ahead <= ACCEPT_WINDOW // frame + 1, ahead
    server.resume_reading()
    assert await asyncio.wait_for(done, 60) == 200
    assert seen == list(range(count + 1))
    assert len(progress.read_text()) == count


async def test_process_mode_streaming_into_a_paused_server_keeps_connector_and_workers_small(tmp_path, server):
    """The console command in process mode (its default): code in a worker streams 150 replies of 4 MB
    while the server stops reading. The connector and its workers together stay bounded; everything
    arrives in order after."""
    (tmp_path / "serverConfig").mkdir()
    (tmp_path / "serverConfig" / "server.config").write_text(
        f"targetServer = {server.url}\nauthToken = {TOKEN}\nsources = {SOURCE}\n")
    proc = await asyncio.create_subprocess_exec(*console_command(), cwd=tmp_path,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    def rss(process):
        total = 0
        for p in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    try:
        await server.wait_attached(SOURCE, timeout=30)
        connector = psutil.Process(proc.pid)
        assert (await server.query({"code": "warm = 1"}, timeout=30)).results == {"warm": 1}
        server.pause_reading()
        seen, done = await _collect(server, {"code": STREAM, "presetValues": {
            "size": 4 << 20, "count": 150, "progress": ""}})
        peak = 0
        for _ in range(40):         # 8 s paused
            peak = max(peak, rss(connector))
            await asyncio.sleep(0.2)
        assert not done.done()
        server.resume_reading()
        assert await asyncio.wait_for(done, 120) == 200
        assert seen == list(range(151))
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
    assert peak < 400 * 2 ** 20, f"connector and workers reached {peak / 2 ** 20:.0f} MB while the server was paused"


@pytest.mark.parametrize("mode", ["inline", "process"])
async def test_a_flood_of_queries_while_the_server_does_not_read_cannot_grow_the_outbox(server, start_connector,
                                                                                     mode):
    """The link stops taking queries while its outbox is full (it holds what one read brought and stops
    reading): their terminal
    replies cannot pile up behind a server that does not read. All are answered once it reads again."""
    server.set_source_config(SOURCE, {"executionMode": mode, "workers": 1})
    limit = 1 << 20
    running = await start_connector(maxPendingBytes=limit)
    link = running.session.link
    assert (await server.query({"code": "warm = 1"}, timeout=30)).results == {"warm": 1}
    reply = 50_000
    server.pause_reading()
    addresses = []
    for n in range(300):        # 15 MB of replies in all
        addresses.append(await server.send_query(SOURCE, {"code": "data = 'q' * size; i = n",
                                                          "presetValues": {"size": reply, "n": n}}))
        await asyncio.sleep(0.005)
    await asyncio.sleep(2)
    assert link.peak_pending_bytes <= limit + 20 * reply, link.peak_pending_bytes
    assert link.counters.held > 0 and link.counters.read_pauses > 0
    server.resume_reading()
    for n, address in enumerate(addresses):
        result = await server.replies_for(address, timeout=60)
        assert result.status == 200 and result.results["i"] == n


async def test_a_link_waiting_for_room_before_reading_still_notices_a_dead_socket(server, start_connector):
    """The link holds queries and stops reading while the outbox is full; a socket that dies meanwhile
    must still end that wait, so that the link reconnects (the outbox would never drain otherwise)."""
    server.set_source_config(SOURCE, {"executionMode": "inline"})
    running = await start_connector(maxPendingBytes=1 << 20)
    link = running.session.link
    server.pause_reading()
    await _collect(server, {"code": STREAM, "presetValues": {"size": 256 * 1024, "count": 100, "progress": ""}})
    await asyncio.sleep(1.5)            # the outbox is full: the code waits
    for _ in range(2):
        await server.send_query(SOURCE, {"code": "x = 1"})
    async with asyncio.timeout(10):
        while link.counters.read_pauses < 1:
            await asyncio.sleep(0.05)
    await server.drop(SOURCE, abrupt=True)
    server.resume_reading()
    await server.wait_attached(SOURCE, timeout=20)
    assert server.connects(SOURCE) == 2
    assert (await server.query({"code": "after = 1"}, timeout=30)).results == {"after": 1}

"""The worker pipe without I/O (engine/channel.py): bytes in, messages out; runs out against credit; what
a worker that lies gets. No process, no socket: the channel is fed bytes as a worker would write them."""
from __future__ import annotations

import pickle

import pytest

from pyexec_connector import errors
from pyexec_connector.engine import wire
from pyexec_connector.engine.channel import Frames, WorkerChannel
from pyexec_connector.engine.messages import (
    ACKED,
    Answered,
    Cancel,
    Credit,
    Declined,
    Done,
    Failed,
    Ready,
    Relay,
    Reply,
)
from pyexec_connector.errors import QueryError


def frames(*messages) -> bytes:
    return b"".join(wire.encode(m) for m in messages)


def channel_with_runs(*qids: int, granted: int = 16, max_size: int = 4096) -> WorkerChannel:
    channel = WorkerChannel(max_size=max_size)
    assert channel.receive_data(frames(Credit(granted, 0))) == [Credit(granted, 0)]
    for qid in qids:
        channel.send_run(b"run-%d" % qid, qid, take_by=5.0)
    channel.data_to_send()
    return channel


# ---- bytes in, messages out ----------------------------------------------------------------------------

WORKER_SAYS = [Ready(41), Credit(16, 0), ACKED]


def test_messages_come_out_in_order_whatever_the_chunks():
    data = frames(*WORKER_SAYS)
    for size in (1, 2, 3, 7, len(data)):
        channel = WorkerChannel(max_size=4096)
        out = []
        for start in range(0, len(data), size):
            out += channel.receive_data(data[start:start + size])
        assert out == WORKER_SAYS, size


def test_a_run_s_ends_come_out_once_and_unknown_runs_are_dropped():
    channel = channel_with_runs(1, 2, 3)
    error = QueryError(errors.BAD_QUERY, "no")
    said = [Answered(1, '{"x":1}', (0, 1)), Done(2, "{}", None, None, None, (0, 2)), Failed(3, error, (0, 3)),
            Answered(1, "{}", (0, 1)), Reply(9, "{}", False, 100, None)]
    out = channel.receive_data(frames(*said))
    assert [type(m) for m in out] == [Answered, Done, Failed, Reply]      # a Reply's qid is the engine's to judge
    assert channel.unknown == 1      # the second end of run 1


def test_a_partial_message_is_all_that_is_buffered():
    data = frames(Answered(1, "x" * 100, (0, 0)))
    reader = Frames(trusted=False, max_size=4096)
    assert reader.feed(data[:50]) == [] and reader.buffered == 50
    assert len(reader.feed(data[50:])) == 1 and reader.buffered == 0


# ---- limits --------------------------------------------------------------------------------------------

def test_an_oversized_frame_is_refused_from_its_length_alone():
    channel = WorkerChannel(max_size=100)
    with pytest.raises(wire.MalformedMessage, match="over the limit"):
        channel.receive_data((101).to_bytes(4, "big") + b"A")       # its body never needs to arrive
    with pytest.raises(wire.MalformedMessage):                        # broken for good
        channel.receive_data(frames(ACKED))


def test_a_frame_at_the_limit_is_accepted():
    text = "y" * (100 - 25)
    message = Answered(1, text, (0, 0))
    channel = channel_with_runs(1, max_size=len(wire.encode(message)) - 4)      # the limit, exactly
    assert channel.receive_data(wire.encode(message)) == [message]


# ---- a worker that lies --------------------------------------------------------------------------------

@pytest.mark.parametrize("lie", [Credit(8, 0), Credit(16, 1), Credit(20, 5)], ids=["takes-credit-back",
                                                                                 "read-a-run-never-sent",
                                                                                 "read-more-than-sent"])
def test_credit_that_lies_breaks_the_channel(lie):
    channel = channel_with_runs()          # granted 16, nothing sent
    with pytest.raises(wire.MalformedMessage, match="credit"):
        channel.receive_data(frames(lie))


def test_messages_only_the_connector_sends_are_refused():
    channel = WorkerChannel()
    with pytest.raises(wire.MalformedMessage):
        channel.receive_data(frames(Relay(1, "a", None, b"{}")))
    with pytest.raises(wire.MalformedMessage):
        WorkerChannel().receive_data(frames(Cancel(1)))


@pytest.mark.parametrize("body", [b"A\x00", b"C" + b"\x00" * 5, pickle.dumps((999, 1)), b"\x80\x05garbage",
                                  pickle.dumps(("os", "system"))],
                         ids=["short-answered", "short-credit", "unknown-kind", "garbled-pickle", "not-a-message"])
def test_garbled_frames_break_the_channel(body):
    with pytest.raises(wire.MalformedMessage):
        WorkerChannel().receive_data(len(body).to_bytes(4, "big") + body)


def test_a_declined_run_never_sent_is_dropped():
    channel = channel_with_runs(1)
    assert channel.receive_data(frames(Declined(7), Declined(1))) == [Declined(1)]
    assert channel.unknown == 1


# ---- runs out, against credit ----------------------------------------------------------------------------

def test_runs_use_credit_and_go_out_together():
    channel = channel_with_runs(granted=3)
    assert channel.credit == 3
    channel.send_run(b"run-1", 1, 10.0)
    channel.send_run(b"run-2", 2, 10.0)
    assert channel.credit == 1 and channel.sent == 2
    channel.send(Cancel(7))
    assert channel.data_to_send() == b"run-1run-2" + wire.encode(Cancel(7))
    assert channel.data_to_send() == b"" and channel.written == 10 + len(wire.encode(Cancel(7)))
    assert channel.receive_data(frames(Credit(5, 2))) == [Credit(5, 2)] and channel.credit == 3


def test_a_run_s_end_says_every_run_sent_before_it_was_read():
    channel = channel_with_runs(1, 2, 3, granted=8)
    assert channel.received == 0
    assert channel.receive_data(frames(Done(2, "{}", None, None, None, (0, 0)))) != []
    assert channel.received == 2                 # runs are read in order: 1 was read before 2
    assert channel.receive_data(frames(Done(1, "{}", None, None, None, (0, 0)))) != []
    assert channel.received == 2                 # an earlier run's end says nothing new
    with pytest.raises(wire.MalformedMessage):   # and a Credit saying it read less is a lie
        channel.receive_data(frames(Credit(8, 1)))


def test_runs_not_written_yet_are_taken_back_whole_and_the_rest_stays_in_order():
    channel = channel_with_runs(1, granted=4)       # run 1 written: 5 bytes
    channel.send_run(b"run-2", 2, 10.0)
    channel.send(Cancel(7))
    channel.send_run(b"run-3", 3, 10.0)
    assert channel.runs_queued == 2 and channel.sent == 3 and channel.credit == 1
    assert channel.take_back_queued() == [2, 3]
    # the worker never sees them: not sent as far as credit goes, and what else was queued goes as it was
    assert channel.runs_queued == 0 and channel.sent == 1 and channel.credit == 3
    assert channel.take_back_queued() == []
    assert channel.data_to_send() == wire.encode(Cancel(7))
    # it says nothing of runs it never had: their ends would be dropped as unknown
    assert channel.receive_data(frames(Declined(2))) == [] and channel.unknown == 1
    # the run it was written keeps its place: due and unread, it is taken back; a Credit reading all it
    # was sent is no lie
    assert channel.overdue(6.0, {1}, lambda: 5 + len(wire.encode(Cancel(7)))) == [1]
    assert channel.receive_data(frames(Credit(6, 1))) == [Credit(6, 1)]


def test_runs_not_read_by_their_take_by_are_taken_back():
    channel = channel_with_runs(1, 2, 3)       # 15 bytes written, 5 each
    running = {1, 2, 3}
    assert channel.overdue(4.0, running, lambda: 15) == []       # not due yet
    assert channel.overdue(6.0, running, lambda: 5) == [3]       # read the first two: the third is not
    assert channel.unconfirmed == 0
    assert channel.receive_data(frames(Declined(3))) == []       # it read it late and declined it: known


def test_runs_answered_are_not_taken_back_and_the_socket_is_asked_only_when_one_is_due():
    channel = channel_with_runs(1, 2)
    asked = []

    def unread() -> int:
        asked.append(1)
        return 10

    assert channel.overdue(4.0, {1, 2}, unread) == [] and not asked
    assert channel.overdue(6.0, {2}, unread) == [2] and asked == [1]     # 1 ended: it read it
    assert channel.overdue(7.0, {2}, unread) == []                       # taken back once

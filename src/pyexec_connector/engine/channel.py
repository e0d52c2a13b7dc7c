"""The worker pipe without I/O: bytes in, messages out; messages in, bytes out (as websockets' sans-I/O
protocol objects are). `Frames` cuts a byte stream into messages (engine/wire.py is the codec) under a
size limit; `WorkerChannel` is the connector's end of one worker's pipe: framing, what the worker is
trusted to say, the credit it granted, and which runs it may not have read yet. Neither reads nor
writes anything: `PipeProtocol` (an ordinary asyncio Protocol) moves the bytes, and the pool acts on the
messages. Every rule of the pipe is here, so every rule is testable without a process.

The channel's states, for one worker: open (messages flow; runs go out against credit) -> broken (it
sent something this side does not accept: `receive_data` raised, and raises again; the pool kills it) or
closed (its pipe ended: `PipeProtocol.closed`)."""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Container
from typing import Any, cast

from . import wire
from .messages import (
    Answered,
    Cancelled,
    Credit,
    Declined,
    Done,
    Failed,
)
from .wire import MalformedMessage

_LENGTH = wire.LENGTH
_ENDS_RUN = (Answered, Done, Failed, Cancelled, Declined)


class Frames:
    """A byte stream cut into messages. Bodies longer than `max_size` are refused as soon as their
    length is read (before their bytes are buffered); what is buffered is one partial message at most."""

    def __init__(self, trusted: bool, max_size: int | None = None):
        self.trusted = trusted
        self.max_size = max_size
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """The messages `data` completes, in order; raises MalformedMessage (the stream is then unusable)."""
        if self._partial:
            self._partial += data
            buffer: bytes | bytearray = self._partial
        else:
            buffer = data
        view = memoryview(buffer)
        messages = []
        start, end, limit, trusted = 0, len(buffer), self.max_size, self.trusted
        try:
            while end - start >= _LENGTH.size:
                length = _LENGTH.unpack_from(view, start)[0]
                if limit is not None and length > limit:
                    raise MalformedMessage(f"a message of {length} bytes announced, over the limit of {limit}")
                stop = start + _LENGTH.size + length
                if stop > end:
                    break
                messages.append(wire.decode(view[start + _LENGTH.size:stop], trusted))
                start = stop
        except MalformedMessage:
            raise
        except Exception as exc:    # a binary message cut short, bad UTF-8...: as garbled as a bad pickle
            raise MalformedMessage(f"{type(exc).__name__}: {exc}") from None
        finally:
            view.release()
        if buffer is self._partial:
            del self._partial[:start]
        elif start < end:
            self._partial += data[start:]
        return messages

    @property
    def buffered(self) -> int:
        """Bytes of a message not complete yet."""
        return len(self._partial)


class WorkerChannel:
    """The connector's end of one worker's pipe. In: `receive_data(bytes)` -> the worker's messages,
    checked (a worker runs user code: it may lie). Out: `send`/`send_run` queue bytes, `data_to_send()`
    takes them. Credit: a run goes out only against credit the worker granted (`credit`); `overdue()`
    names the runs it did not read by their take_by."""

    def __init__(self, max_size: int | None = None):
        self._frames = Frames(trusted=False, max_size=max_size)
        self.granted = 0            # runs it asked for over its life (Credit.granted)
        self.received = 0           # runs it read, as far as known (Credit.received, or a later run's end)
        self.sent = 0               # runs queued for it over its life
        self.written = 0            # bytes taken by data_to_send() over its life
        self.unknown = 0            # messages about runs it was never sent, dropped
        self._out: list[bytes] = []
        self._out_size = 0
        self._queued: list[tuple[int, int]] = []    # (qid, index in _out) of the runs data_to_send() would give
        # runs sent that it has not ended nor had taken back -> how many runs it had been sent with it: a
        # run's end says it read every run sent up to it (it reads them in order), so `received` needs no Credit
        self._open: dict[int, int] = {}
        self._unconfirmed: deque[tuple[int, int, float]] = deque()     # (qid, end offset, take_by)
        self._broken: MalformedMessage | None = None

    # ---- in --------------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Any]:
        """The messages `data` completes. Raises MalformedMessage for a garbled or oversized frame, a
        message a worker may not send, or credit that lies (taken back, or runs read that were never
        sent); after that, the channel is broken and raises again."""
        if self._broken is not None:
            raise self._broken
        try:
            messages = self._frames.feed(data)
            if not messages:
                return messages
            kept = []
            for message in messages:
                kind = type(message)
                if kind is Credit:
                    self._credit(message)
                elif kind in _ENDS_RUN:
                    index = self._open.pop(message.qid, None)
                    if index is None:
                        self.unknown += 1    # ended already (taken back, then declined), or a lie: nothing to do
                        continue
                    if index > self.received:
                        self.received = index
                kept.append(message)
            return kept
        except MalformedMessage as exc:
            self._broken = exc
            raise

    def _credit(self, credit: Credit) -> None:
        granted, received = credit
        if granted < self.granted or received < self.received or received > self.sent:
            raise MalformedMessage(f"a credit of {granted} granted, {received} read, after {self.granted} "
                                   f"granted and {self.sent} sent")
        self.granted, self.received = granted, received

    # ---- out -------------------------------------------------------------------------------------
    def send(self, message: Any) -> None:
        data = wire.encode(message)
        self._out.append(data)
        self._out_size += len(data)

    def send_run(self, data: bytes, qid: int, take_by: float) -> None:
        """A run's encoded message, to be read by the worker by `take_by` (time.monotonic())."""
        self._queued.append((qid, len(self._out)))
        self._out.append(data)
        self._out_size += len(data)
        self.sent += 1
        self._open[qid] = self.sent
        self._unconfirmed.append((qid, self.written + self._out_size, take_by))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = b"".join(out) if len(out) > 1 else out[0]
        out.clear()
        self._out_size = 0
        self._queued.clear()
        self.written += len(data)
        return data

    @property
    def runs_queued(self) -> int:
        """Runs among what data_to_send() would give."""
        return len(self._queued)

    def take_back_queued(self) -> list[int]:
        """The runs not taken by data_to_send() yet, in the order sent: the worker never sees them (not
        sent, as far as credit goes). What else is queued stays, in order; the runs still owed a read
        are all written ones, so their offsets stand."""
        queued = self._queued
        if not queued:
            return []
        qids = [qid for qid, _ in queued]
        drop = {index for _, index in queued}
        kept = [data for index, data in enumerate(self._out) if index not in drop]
        self._out[:] = kept
        self._out_size = sum(map(len, kept))
        queued.clear()
        self.sent -= len(qids)
        for qid in qids:
            self._open.pop(qid, None)
        unconfirmed = self._unconfirmed
        for qid in reversed(qids):      # the last entries: sent after every written run
            if unconfirmed and unconfirmed[-1][0] == qid:
                unconfirmed.pop()
        return qids

    # ---- credit and taking back ------------------------------------------------------------------
    @property
    def credit(self) -> int:
        """Runs it may be sent now (can be below zero only if the other side sends without asking)."""
        return self.granted - self.sent

    @property
    def unconfirmed(self) -> int:
        return len(self._unconfirmed)

    def overdue(self, now: float, running: Container[int], unread: Callable[[], int]) -> list[int]:
        """The runs whose take_by passed before the worker read them: no longer its own (it declines a run
        it reads late: it reads the clock after the bytes). `running`: the runs still waiting for an end;
        `unread()`: bytes written that it has not read (asked only when some run is due). Call after
        data_to_send() was written."""
        unconfirmed = self._unconfirmed
        while unconfirmed and unconfirmed[0][0] not in running:     # ended: it read it
            unconfirmed.popleft()
        if not unconfirmed or unconfirmed[0][2] >= now:
            return []
        read = self.written - unread()
        while unconfirmed and unconfirmed[0][1] <= read:
            unconfirmed.popleft()
        late: list[int] = []
        while unconfirmed and unconfirmed[0][2] < now:      # take_by grows along the stream
            qid = unconfirmed.popleft()[0]
            if qid in running:
                late.append(qid)
                self._open.pop(qid, None)
        return late

    def forget(self, qid: int) -> None:
        """A run taken back for another reason (it declined it): what it says of it later is dropped."""
        self._open.pop(qid, None)


class PipeProtocol(asyncio.Protocol):
    """Moves bytes between a worker's socket and its channel: what arrives goes to `deliver` as messages,
    in order; a malformed stream to `broken`. Nothing else: the pool decides what the messages mean."""

    def __init__(self, channel: WorkerChannel, deliver: Callable[[list[Any]], None],
                 broken: Callable[[Exception], None]):
        self.channel = channel
        self._deliver = deliver
        self._broken = broken
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)     # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.channel.receive_data(data)
        except MalformedMessage as exc:
            if self.transport is not None:
                self.transport.pause_reading()
            self._broken(exc)
            return
        self._deliver(messages)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class WorkerEnd(asyncio.Protocol):
    """The worker's end of the pipe (engine/worker.py): the connector's bytes cut into messages (trusted:
    the connector wrote them), the first (Init) to `first`, the rest to `take` once `serve()` is called,
    in order, each chunk's then followed by `after()` (its ends go out in one write). `take` returns False
    to stop (Stop). Writes wait in `drain()` while the pipe is full."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._frames = Frames(trusted=True)
        self.transport: asyncio.Transport | None = None
        self.first: asyncio.Future[Any] = loop.create_future()
        self.ended: asyncio.Future[None] = loop.create_future()
        self._early: list[Any] | None = []      # what came after Init, before serve()
        self._take: Callable[[Any], bool] | None = None
        self._after: Callable[[], None] | None = None
        self._writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)     # uvloop's are not asyncio.Transport subclasses

    def serve(self, take: Callable[[Any], bool], after: Callable[[], None]) -> None:
        self._take, self._after = take, after
        early, self._early = self._early or [], None
        self._deliver(early)

    def data_received(self, data: bytes) -> None:
        messages = self._frames.feed(data)
        if self._early is None:        # serving (the first message came long ago)
            self._deliver(messages)
            return
        if not self.first.done():
            if not messages:
                return
            self.first.set_result(messages[0])
            messages = messages[1:]
        if self._early is not None:
            self._early.extend(messages)
            return
        self._deliver(messages)

    def _deliver(self, messages: list[Any]) -> None:
        take, after = self._take, self._after
        assert take is not None and after is not None
        for message in messages:
            if self.ended.done():
                return
            if not take(message):
                self.ended.set_result(None)
                return
        after()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.first.done():
            self.first.set_exception(ConnectionError("the connector closed the pipe"))
        if not self.ended.done():
            self.ended.set_result(None)
        self.resume_writing()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def drain(self) -> None:
        """Until the pipe has room (at once unless the connector reads slower than this writes)."""
        if self._writable is not None:
            await asyncio.shield(self._writable)

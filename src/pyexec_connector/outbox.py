"""The link's outbox: frames waiting for the socket, in order, bounded in bytes.

Nothing is ever refused or dropped: a frame is always queued, in order (a reply must not overtake an
earlier partial reply, and every query gets its terminal reply). The bound is kept by the producers
instead: past `limit` bytes the outbox is full, and `room()` makes a producer wait until the writer has
taken it back under half the limit. So the outbox holds at most `limit` plus one frame per producer in
flight (each of which the producer would hold in memory anyway while it waits)."""
from __future__ import annotations

import asyncio
import sys
from collections import deque

_sizeof = sys.getsizeof


class Outbox(deque[str]):
    """A deque of frames that knows the bytes it holds. Only append(), popleft() and clear() change
    it (what the link uses); each frame counts as the memory its str takes (sys.getsizeof: exact, O(1),
    about its UTF-8 length for the JSON frames the link sends)."""

    def __init__(self, limit: int):
        super().__init__()
        if limit < 1:
            raise ValueError("the outbox limit must be a positive number of bytes")
        self.limit = limit
        self.pending_bytes = 0
        self.peak_bytes = 0          # the most it ever held: what a test or a metric can check
        self.waits = 0               # how many times a producer had to wait for room
        self._room = asyncio.Event()
        self._room.set()
        self.not_full = True         # has_room(), as an attribute: read for every frame in and out

    def append(self, frame: str) -> None:
        super().append(frame)
        size = self.pending_bytes = self.pending_bytes + _sizeof(frame)
        if size > self.peak_bytes:
            self.peak_bytes = size
        if size > self.limit:
            self._room.clear()
            self.not_full = False

    def popleft(self) -> str:
        frame = super().popleft()
        self.pending_bytes -= _sizeof(frame)
        return frame

    def clear(self) -> None:
        super().clear()
        self.pending_bytes = 0
        if not self.not_full:
            self.update_room()

    def update_room(self) -> None:
        """Let producers go on once the writer took the outbox under half its limit (called after each
        batch written rather than per frame). Half, not the limit itself, so that a stream of large frames
        wakes its producer once per batch, not once per frame."""
        if not self.not_full and self.pending_bytes <= self.limit // 2:
            self._room.set()
            self.not_full = True

    def has_room(self) -> bool:
        """Whether room() would return at once."""
        return self.not_full

    async def room(self) -> None:
        """Wait while the outbox is full."""
        if not self.not_full:
            self.waits += 1
            await self._room.wait()

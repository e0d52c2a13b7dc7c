"""What a fork of user code may not do: write to the connector's websocket or a worker pipe, or run the
connector's (or a worker's) loop.

User code may call os.fork() (directly, or through multiprocessing's "fork" start method). The child
inherits the process's sockets and its event loop — and the epoll instance, which it shares with the
parent. Left alone, a child that returns to connector code answers the query a second time over the
inherited websocket, or goes on reading a worker's pipe as a second "worker". So, in a forked child:

- every socket registered here is replaced (dup2) by a socket connected to nothing, at once, before
  the child's user code goes on: a write fails in the child and the parent's stream is untouched;
- the child exits (os._exit) as soon as control comes back to the loop, and wherever connector code
  calls `check()` (the completion of a query, a worker's messages).

A child that only runs user code (multiprocessing's target, then os._exit) is unaffected. Only a
process that `arm()`ed the guard has anything to protect: a template process that forks workers on
purpose does not arm it until it is itself a worker."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket

_owner: int | None = None          # the pid that armed the guard
_forked = False                    # this is a fork of the armed process (checked on hot paths: a flag)
_sockets: set[int] = set()         # file descriptors of the sockets a child must not use


def arm() -> None:
    """This process owns connector sockets or a worker's loop: protect them from its forks."""
    global _owner, _forked
    if _owner != os.getpid():
        _owner = os.getpid()
        _forked = False
        _sockets.clear()        # a process's own sockets, not those of the one it was forked from


def disarm() -> None:
    """This process forks on purpose again (a zygote after running the worker runtime to warm it up):
    nothing of its own is protected from its children."""
    global _owner, _forked
    _owner = None
    _forked = False
    _sockets.clear()


def protect(fd: int) -> None:
    """A socket of this process a fork of user code must never use (arms the guard)."""
    arm()
    _sockets.add(fd)


def release(fd: int) -> None:
    _sockets.discard(fd)


def forked() -> bool:
    """Whether this is a fork of an armed process (user code's child)."""
    return _forked


def check() -> None:
    """Connector code reached in a forked child: end the child, at once and silently."""
    if _forked:
        os._exit(0)


def _after_fork_in_child() -> None:
    global _forked
    if _owner is None or _owner == os.getpid():
        return
    _forked = True
    for fd in list(_sockets):
        with contextlib.suppress(OSError):
            dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            os.dup2(dead.fileno(), fd)
            dead.close()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:    # forked from another thread: the loop's thread does not exist in the child
        return
    loop.call_soon(os._exit, 0)


os.register_at_fork(after_in_child=_after_fork_in_child)

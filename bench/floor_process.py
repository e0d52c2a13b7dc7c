"""The process floor: the floor's per-query work (bench/floor.py) in a second process, as any connector
that keeps user code out of its own process must do it. The websocket process relays each frame as it
came to the worker and the worker's replies back, batched both ways; nothing else. It shows what the
split itself costs on this machine, against which `ours/process` can be read.
Run: python bench/floor_process.py WS_URL TOKEN SOURCE"""
import asyncio
import socket
import struct
import sys
from pathlib import Path

import aiohttp
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor import Floor, attach, rest_url  # noqa: E402

LENGTH = struct.Struct("!I")


def whole_message(reader: asyncio.StreamReader) -> bool:
    buffer = reader._buffer  # noqa: SLF001
    return len(buffer) >= 4 and len(buffer) >= 4 + LENGTH.unpack_from(buffer)[0]


async def read(reader: asyncio.StreamReader) -> bytes:
    return await reader.readexactly(LENGTH.unpack(await reader.readexactly(4))[0])


async def worker(fd: int, token: str, rest: str) -> None:
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    loop = asyncio.get_running_loop()
    out: list[bytes] = []

    def flush() -> None:
        if out:
            writer.write(b"".join(out))
            out.clear()

    async def send(text: str) -> None:
        if not out:     # replies a task sends later (codeHandlesReturn) go at the end of its step
            loop.call_soon(flush)
        data = text.encode()
        out.append(LENGTH.pack(len(data)) + data)

    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})
    floor = Floor(send, http, rest)
    while True:
        await floor.answer(await read(reader))
        if not whole_message(reader):      # answered all it has: one write
            flush()


async def main(url: str, token: str, source: str) -> None:
    mine, theirs = socket.socketpair()
    child = await asyncio.create_subprocess_exec(sys.executable, __file__, "worker", str(theirs.fileno()), token,
                                                 rest_url(url), pass_fds=(theirs.fileno(),))
    theirs.close()
    reader, writer = await asyncio.open_connection(sock=mine)
    async with connect(url, compression=None, max_size=None) as ws:     # the asyncio one, also in websockets 13
        await attach(ws, token, source)

        async def replies() -> None:   # every reply that has come, in one socket write
            while True:
                ws.protocol.send_text(await read(reader))
                while whole_message(reader):
                    ws.protocol.send_text(await read(reader))
                ws.transport.write(b"".join(ws.protocol.data_to_send()))

        relay = asyncio.create_task(replies())
        async for raw in ws:
            data = raw.encode() if isinstance(raw, str) else raw
            writer.write(LENGTH.pack(len(data)) + data)
        relay.cancel()
    child.kill()


def run(coro) -> None:
    """On uvloop when it is installed, as our connector runs (the floor itself runs on asyncio's loop)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        run(worker(int(sys.argv[2]), sys.argv[3], sys.argv[4]))
    else:
        run(main(*sys.argv[1:4]))

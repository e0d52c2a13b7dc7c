"""The floor: the least a connector can do and still answer the protocol. Validate, connectExtension,
then per query: parse, exec a cached code object, encode the globals, reply. No validation, no
features, no error handling beyond a 400. Run: python bench/floor.py [--uvloop] WS_URL TOKEN SOURCE
(bench/floor_process.py runs the same per-query work in a second process.)"""
import asyncio
import json
import sys

import aiohttp
import websockets

SKIP = {"__name__", "__file__", "__builtins__", "connector_connection", "connector_context"}


class Conn:  # the one connector_connection call streaming scenarios use
    def __init__(self, send):
        self.send = send

    async def send_query_response(self, ctx, status, body):
        await self.send(json.dumps({"status": status, "headers": {"X-Reply-Address": ctx}, "body": body}))


class Floor:
    """The per-query work; `send` puts one reply frame (text) on its way to the server."""

    def __init__(self, send, http: aiohttp.ClientSession, rest: str):
        self.send, self.http, self.rest = send, http, rest
        self.conn = Conn(send)
        self.cache: dict = {}  # name -> (fingerprint, code), 128 entries, oldest dropped

    async def answer(self, raw) -> None:
        msg = json.loads(raw)
        if msg.get("op") != "query":
            return
        address, q = msg["messageHeaders"]["REPLY_ADDR_HEADER"], msg["object"]
        name, text = q.get("script") or q.get("name"), q.get("code")
        cache = self.cache
        if q.get("script"):
            async with self.http.get(f"{self.rest}/api/v1/resources/documents/{name}") as r:
                meta = await r.json()
            fingerprint = meta["ars_modifiedAt"]
            if cache.get(name, (None,))[0] != fingerprint:
                async with self.http.get(self.rest + meta["content"]) as r:
                    text = await r.text()
        else:
            fingerprint = text
        entry = cache.get(name)
        if entry is None or (entry[0] != fingerprint and fingerprint is not None):
            entry = (fingerprint, compile(text, name or "<query>", "exec"))
            if name:
                cache[name] = entry
                if len(cache) > 128:
                    del cache[next(iter(cache))]
        g = {"__name__": "__main__", "connector_connection": self.conn, "connector_context": address,
             **(q.get("presetValues") or {})}
        try:
            exec(entry[1], g)
            if q.get("codeHandlesReturn"):
                return
            body = {"pythonCallResults": {k: v for k, v in g.items() if k not in SKIP}}
            await self.send(json.dumps({"status": 200, "headers": {"X-Reply-Address": address}, "body": body}))
        except Exception as exc:  # noqa: BLE001
            await self.send(json.dumps({"status": 400, "headers": {"X-Reply-Address": address},
                                        "body": {"messageCode": "floor", "messageTemplate": repr(exc)}}))


async def attach(ws, token: str, source: str) -> None:
    await ws.send(json.dumps({"op": "validate", "resourceName": "system.credentials", "object": token}))
    await ws.recv()
    await ws.send(json.dumps({"op": "connectExtension", "resourceName": "sources", "resourceId": source,
                              "parameters": {"reconnectSecret": f"{source}_floor"}}))


def rest_url(url: str) -> str:
    return url.replace("ws", "http", 1).split("/api/")[0]


async def main(url: str, token: str, source: str) -> None:
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})
    async with websockets.connect(url, compression=None, max_size=None) as ws:
        await attach(ws, token, source)
        floor = Floor(ws.send, http, rest_url(url))
        async for raw in ws:
            await floor.answer(raw)
    await http.close()


if __name__ == "__main__":
    # --uvloop: on uvloop, as our connector runs when it is installed (python -m bench --floor-loop uvloop)
    arguments = sys.argv[1:]
    if arguments[:1] == ["--uvloop"]:
        import uvloop
        uvloop.run(main(*arguments[1:4]))
    else:
        asyncio.run(main(*arguments[0:3]))

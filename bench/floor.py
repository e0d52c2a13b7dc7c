"""The floor: the least a connector can do and still answer the protocol. Validate, connectExtension,
then per query: parse, exec a cached code object, encode the globals, reply. No validation, no
features, no error handling beyond a 400. Run: python bench/floor.py WS_URL TOKEN SOURCE"""
import asyncio
import json
import sys

import aiohttp
import websockets

SKIP = {"__name__", "__file__", "__builtins__", "connector_connection", "connector_context"}


class Conn:  # the one connector_connection call streaming scenarios use
    def __init__(self, ws):
        self.ws = ws

    async def send_query_response(self, ctx, status, body):
        await self.ws.send(json.dumps({"status": status, "headers": {"X-Reply-Address": ctx}, "body": body}))


async def main(url: str, token: str, source: str) -> None:
    cache: dict = {}  # name -> (fingerprint, code), 128 entries, oldest dropped
    rest = url.replace("ws", "http", 1).split("/api/")[0]
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})
    async with websockets.connect(url, compression=None, max_size=None) as ws:
        await ws.send(json.dumps({"op": "validate", "resourceName": "system.credentials", "object": token}))
        await ws.recv()
        await ws.send(json.dumps({"op": "connectExtension", "resourceName": "sources", "resourceId": source,
                                  "parameters": {"reconnectSecret": f"{source}_floor"}}))
        conn = Conn(ws)
        async for raw in ws:
            msg = json.loads(raw)
            if msg.get("op") != "query":
                continue
            address, q = msg["messageHeaders"]["REPLY_ADDR_HEADER"], msg["object"]
            name, text = q.get("script") or q.get("name"), q.get("code")
            if q.get("script"):
                async with http.get(f"{rest}/api/v1/resources/documents/{name}") as r:
                    meta = await r.json()
                fingerprint = meta["ars_modifiedAt"]
                if cache.get(name, (None,))[0] != fingerprint:
                    async with http.get(rest + meta["content"]) as r:
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
            g = {"__name__": "__main__", "connector_connection": conn, "connector_context": address,
                 **(q.get("presetValues") or {})}
            try:
                exec(entry[1], g)
                if q.get("codeHandlesReturn"):
                    continue
                body = {"pythonCallResults": {k: v for k, v in g.items() if k not in SKIP}}
                await ws.send(json.dumps({"status": 200, "headers": {"X-Reply-Address": address}, "body": body}))
            except Exception as exc:  # noqa: BLE001
                await ws.send(json.dumps({"status": 400, "headers": {"X-Reply-Address": address},
                                          "body": {"messageCode": "floor", "messageTemplate": repr(exc)}}))
    await http.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))

"""`pyexec-connector demo`: a full round trip against the built-in stand-in of a Vantiq server."""
from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from .config import build_server_config
from .connector import Connector
from .devserver import DevServer
from .logsetup import configure_logging

SOURCE = "pythonSource"

SCRIPT_NAME = "demo/statistics.py"
SCRIPT = '''\
import statistics

mean = statistics.mean(samples)
spread = statistics.pstdev(samples)
outliers = [x for x in samples if abs(x - mean) > 2 * spread]
'''

STREAM = '''\
import asyncio


async def emit_rows(count):
    for n in range(count - 1):
        await connector_connection.send_query_response(connector_context, 100, {"row": n})
    await connector_connection.send_query_response(connector_context, 200, {"row": count - 1})
    await connector_connection.send_notification({"rowsSent": count})


asyncio.get_event_loop().create_task(emit_rows(row_count))
'''

EXAMPLES: list[tuple[str, dict[str, Any]]] = [
    ("inline code with presetValues",
     {"code": "greeting = f'Hello, {who}!'\nsquares = [n * n for n in range(count)]",
      "name": "demo/greeting", "presetValues": {"who": "Vantiq", "count": 5}}),
    (f"a script stored as the document {SCRIPT_NAME}",
     {"script": SCRIPT_NAME, "presetValues": {"samples": [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0, 30.0]}}),
    ("codeHandlesReturn: the code streams its own rows, then sends a notification",
     {"code": STREAM, "name": "demo/stream", "codeHandlesReturn": True, "presetValues": {"row_count": 3}}),
    ("a deliberate error: the code divides by zero",
     {"code": "ratio = hits / misses", "presetValues": {"hits": 1, "misses": 0}}),
]


def _vail(params: dict[str, Any]) -> str:
    clauses = ", ".join(f"{k} = {json.dumps(v)}" for k, v in params.items())
    return f"SELECT * FROM SOURCE {SOURCE} WITH {clauses}"


async def _demo(out) -> int:
    server = DevServer(sources=(SOURCE,))
    await server.start()
    server.put_document(SCRIPT_NAME, SCRIPT)
    print(f"Stand-in Vantiq server listening on {server.url} (loopback only)", file=out)
    config = build_server_config({"targetServer": server.url, "authToken": server.token, "sources": SOURCE},
                                 env={}, file="(demo)")
    connector = Connector(config, backoff_initial=0.1, backoff_max=1.0)
    runner = asyncio.create_task(connector.run())
    failures = 0
    try:
        await connector.wait_ready(timeout=15)
        print(f"Connector connected as source {SOURCE}\n", file=out)
        for number, (title, params) in enumerate(EXAMPLES, 1):
            print(f"--- {number}. {title}", file=out)
            print(f"VAIL> {_vail(params)}", file=out)
            result = await server.query(params, SOURCE, timeout=15)
            for reply in result.replies:
                status = reply["status"]
                print(f"  reply {status}: {json.dumps(reply.get('body'), indent=None)}", file=out)
            expected_error = "error" in title
            if (result.status >= 300) != expected_error:
                failures += 1
            if params.get("codeHandlesReturn"):
                notes = await server.wait_notifications(SOURCE, 1, timeout=10)
                print(f"  notification on /sources/{SOURCE}: {json.dumps(notes[-1])}", file=out)
            print(file=out)
    finally:
        connector.stop()
        await runner
        await server.stop()
    print("Demo finished: " + ("every query answered as expected." if not failures
                                else f"{failures} quer{'y' if failures == 1 else 'ies'} answered unexpectedly."),
          file=out)
    return 0 if not failures else 1


def run_demo(log_level: str = "WARNING", out=None) -> int:
    configure_logging(log_level)
    return asyncio.run(_demo(out or sys.stdout))

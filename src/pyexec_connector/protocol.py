"""The wire format of the Vantiq extension-source protocol: frames in and out, as pure functions.
No I/O here."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import Any

import orjson

from . import values
from .errors import QueryError

STATUS_PARTIAL = 100
STATUS_COMPLETE = 200
STATUS_EMPTY = 204
STATUS_ERROR = 400
TERMINAL_STATUSES = frozenset({STATUS_COMPLETE, STATUS_EMPTY})
QUERY_RESPONSE_CODES = frozenset({STATUS_PARTIAL, STATUS_COMPLETE, STATUS_EMPTY})

_loads = json.loads
_fast_loads = orjson.loads
_FAST_REFUSED = orjson.JSONDecodeError
# orjson reads an integer beyond 64 bits as a float where the standard library keeps it exact: a run of
# 19 digits (the shortest such integer, -9223372036854775809) sends the frame to the standard library
_DIGITS = bytes(48 if 48 <= byte <= 57 else 32 for byte in range(256))     # each digit "0", the rest " "
_LONG_RUN = b"0" * 19


# Compact JSON of anything the connector sends, through the one value encoder (values.py): numpy, pandas,
# datetimes... become data, NaN null. Raises values.Unencodable (a TypeError).
dumps = values.dumps


def loads(raw: str | bytes) -> Any:
    """A frame's JSON, read as parse_frame reads it: always what json.loads gives (or raises). orjson reads
    it when it can only agree: it refuses what it reads otherwise (NaN and Infinity, lone surrogates, a byte
    order mark, UTF-16 or 32, bad UTF-8, 1e400), and frames that could hold an integer beyond 64 bits or
    nest deeper than the standard library's recursion allows never reach it."""
    if type(raw) is bytes and _LONG_RUN not in raw.translate(_DIGITS):
        depth = sys.getrecursionlimit() // 2       # more than the nesting this many brackets can make
        if len(raw) <= depth or raw.count(b"[") + raw.count(b"{") <= depth:
            try:
                return _fast_loads(raw)
            except _FAST_REFUSED:
                pass
    return _loads(raw)


# ---- frames from the server ----------------------------------------------------------------------

@dataclass(slots=True)
class QueryFrame:
    """Not frozen, though never changed once made: a frozen dataclass's __init__ sets each field through
    object.__setattr__, several times the cost, and one is made per query."""
    reply_address: str
    params: Any          # the WITH clause; validated later, may be anything
    raw: bytes | None = None   # the frame as received (process mode relays it to a worker as it is)


@dataclass(frozen=True, slots=True)
class ConfigureFrame:
    config: Any


@dataclass(frozen=True, slots=True)
class ReconnectRequiredFrame:
    pass


@dataclass(frozen=True, slots=True)
class PublishFrame:
    payload: Any


@dataclass(frozen=True, slots=True)
class StatusFrame:
    status: int
    body: Any


@dataclass(frozen=True, slots=True)
class BadFrame:
    """Anything we cannot act on; `reason` is for the log."""
    reason: str
    reply_address: str | None = None


Frame = QueryFrame | ConfigureFrame | ReconnectRequiredFrame | PublishFrame | StatusFrame | BadFrame


# The reply address of a frame that cannot be parsed (cut off, too large): found by a scan, not a parse,
# so that a huge frame costs no more memory than its bytes. Best effort: the first messageHeaders wins.
_REPLY_ADDRESS = re.compile(rb'"messageHeaders"\s*:\s*\{[^{}]*?"REPLY_ADDR_HEADER"\s*:\s*("(?:[^"\\]|\\.)*")')


def sniff_reply_address(raw: str | bytes) -> str | None:
    """The query's reply address read straight from the raw frame, or None. Never raises."""
    data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
    match = _REPLY_ADDRESS.search(data)
    if match is None:
        return None
    try:
        address = _loads(match.group(1))
    except (ValueError, TypeError):
        return None
    return address if isinstance(address, str) and address else None


def parse_frame(raw: str | bytes) -> Frame:
    """One websocket message (text or binary) into a Frame. Never raises. A frame that is not JSON but
    names a reply address comes back as a BadFrame carrying it, so that its query can still be answered."""
    try:
        message = loads(raw)
    except (ValueError, TypeError, RecursionError) as exc:   # includes UnicodeDecodeError; nesting too deep
        reason = "nested too deeply" if isinstance(exc, RecursionError) else f"not JSON: {exc}"
        return BadFrame(reason, sniff_reply_address(raw))
    if not isinstance(message, dict):
        return BadFrame(f"a JSON {type(message).__name__}, not an object")
    op = message.get("op")
    if op == "query":
        headers = message.get("messageHeaders")
        address = headers.get("REPLY_ADDR_HEADER") if isinstance(headers, dict) else None
        if not isinstance(address, str) or not address:
            return BadFrame("query without messageHeaders.REPLY_ADDR_HEADER")
        return QueryFrame(address, message.get("object"), raw if isinstance(raw, bytes) else None)
    if op == "configureExtension":
        obj = message.get("object")
        return ConfigureFrame(obj.get("config") if isinstance(obj, dict) else None)
    if op == "reconnectRequired":
        return ReconnectRequiredFrame()
    if op == "publish":
        return PublishFrame(message.get("object"))
    if op is None and "status" in message:
        status = message.get("status")
        if isinstance(status, int) and not isinstance(status, bool):
            return StatusFrame(status, message.get("body"))
        return BadFrame(f"status that is not a number: {status!r}")
    return BadFrame(f"unknown op {op!r}")


def status_messages(body: Any) -> str:
    """The human text of an error body: [{"code", "message", "params"}] or a single such object."""
    items = body if isinstance(body, list) else [body]
    texts = []
    for item in items:
        if isinstance(item, dict):
            code = item.get("code") or item.get("messageCode")
            text = item.get("message") or item.get("messageTemplate") or ""
            texts.append(f"{code}: {text}" if code else str(text))
        elif item is not None:
            texts.append(str(item))
    return "; ".join(texts) or "(no message)"


# ---- frames to the server --------------------------------------------------------------------

def validate_frame(token: str) -> str:
    return dumps({"op": "validate", "resourceName": "system.credentials", "object": token})


def connect_frame(source: str, reconnect_secret: str) -> str:
    return dumps({"op": "connectExtension", "resourceName": "sources", "resourceId": source,
                  "parameters": {"reconnectSecret": reconnect_secret}})


def reply_frame(reply_address: str, status: int, body: Any = None) -> str:
    frame: dict[str, Any] = {"status": status, "headers": {"X-Reply-Address": reply_address}}
    if status != STATUS_EMPTY:
        frame["body"] = body
    return dumps(frame)


def reply_frame_raw(reply_address: str, status: int, body_json: str) -> str:
    """A reply whose body is already JSON text: spares decoding and re-encoding it."""
    return '{"status":%d,"headers":{"X-Reply-Address":%s},"body":%s}' % (
        status, values.encode_str(reply_address), body_json)


def error_frame(reply_address: str, error: QueryError) -> str:
    body = error.to_body()
    try:
        return reply_frame(reply_address, STATUS_ERROR, body)
    except values.Unencodable:    # user code may raise QueryError with any parameters: the error still goes out
        body["parameters"] = [_parameter(p) for p in error.params]
        return reply_frame(reply_address, STATUS_ERROR, body)


def _parameter(value: Any) -> Any:
    try:
        values.dumps(value)
    except values.Unencodable:
        return repr(value)
    return value


def notification_frame(source: str, obj: Any) -> str:
    return dumps({"op": "notification", "resourceName": "sources", "resourceId": source, "object": obj})

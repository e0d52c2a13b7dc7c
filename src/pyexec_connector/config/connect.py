"""connectKWArgs: the connector's own TLS keys, the websocket's options (named as websockets' connect() names
them, all typed), and any other keyword loop.create_connection accepts by name."""
from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FilePath,
    model_validator,
)

from .fields import Flag, setting, suggestion


@functools.cache
def websockets_connect_parameters() -> frozenset[str]:
    """Every untyped keyword the link can honour by name: those of loop.create_connection(), which it opens
    the socket with (the typed ones are ConnectOptions' fields, which the link honours on every websockets
    release the package allows). Asked of asyncio itself, so that a key is refused at start rather than by
    a TypeError at every connection attempt (a retry loop with failOnConnectionError off)."""
    import asyncio
    import inspect

    return frozenset(n for n, p in inspect.signature(asyncio.BaseEventLoop.create_connection).parameters.items()
                     if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


# connect() keywords the connector sets itself (TLS comes from disableSslVerification/caFile), or that
# take Python objects JSON cannot give: not for connectKWArgs.
CONNECTOR_OWNED = frozenset({"self", "uri", "protocol_factory", "host", "port", "sock", "ssl", "logger",
                             "create_connection", "process_exception", "extensions"})
ALIASES = {"extra_headers": "additional_headers"}     # websockets' legacy name, as upstream used
OWN_KEYS = ("disableSslVerification", "caFile")       # the connector's, not websockets'


def _proxy(value: Any) -> Any:
    if value is True or value is None or isinstance(value, str):
        return value
    raise ValueError(f"must be a proxy URL or true (the environment's proxy), not {value!r}")


Seconds = Annotated[float, Field(gt=0)]
_PAIR = "a number or a pair [high, low]"


class ConnectOptions(BaseModel):
    """connectKWArgs, as JSON: the connector's TLS keys, then websockets' connect() options. A key neither
    knows is passed on only when loop.create_connection accepts it by name (`passthrough`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    disableSslVerification: Flag = setting(False, "true: do not verify the server's TLS certificate (testing only).")
    caFile: FilePath | None = setting(None, "A PEM file of certificate authorities to trust (a private CA).",
                                      kind="file path")
    open_timeout: Seconds | None = setting(None, "Seconds the websocket handshake may take.")
    close_timeout: Seconds | None = setting(None, "Seconds to wait for the closing handshake.")
    ping_interval: Seconds | None = setting(None, "Seconds between websockets' own keep-alive pings.")
    ping_timeout: Seconds | None = setting(None, "Seconds a ping may wait for its pong before the link is closed.")
    max_size: Annotated[int, Field(ge=1024)] | None = setting(
        None, "Largest incoming message websockets takes, in bytes (maxMessageBytes is the connector's own).")
    max_queue: Annotated[int, Field(ge=1)] | tuple[int | None, int | None] | None = setting(
        None, "Incoming messages websockets buffers: a count, or [high, low].", kind=_PAIR, shape=_PAIR)
    write_limit: Annotated[int, Field(ge=0)] | tuple[Annotated[int, Field(ge=0)], int | None] | None = setting(
        None, "Outgoing bytes buffered before a send waits: a count, or [high, low].", kind=_PAIR, shape=_PAIR)
    compression: Literal["deflate"] | None = setting(None, "\"deflate\" (permessage-deflate); off when absent.")
    user_agent_header: str | None = setting(None, "The User-Agent header of the handshake.")
    origin: str | None = setting(None, "The Origin header of the handshake.")
    additional_headers: dict[str, str] | None = Field(
        None, validation_alias=AliasChoices("additional_headers", "extra_headers"),
        description="Headers added to the handshake, such as {\"X-Header\": \"value\"} (extra_headers also works).",
        json_schema_extra={"shape": "an object of strings, such as {\"X-Header\": \"value\"}",
                           "kind": "object of text"})
    proxy: Annotated[str | bool | None, BeforeValidator(_proxy)] = setting(
        None, "An http:// or https:// proxy URL, true (the default: the environment's proxy) or null for none; "
        "SOCKS is refused.", kind="URL, true or null")
    subprotocols: list[str] | None = setting(None, "Websocket subprotocols to offer.", kind="list of text")
    # untyped keys websockets' connect() (or loop.create_connection) accepts by name
    passthrough: dict[str, Any] = Field(default_factory=dict, exclude=True)
    given: frozenset[str] = Field(default_factory=frozenset, exclude=True)   # the keys the user wrote

    @model_validator(mode="before")
    @classmethod
    def _sort_keys(cls, value: Any) -> Any:
        """Typed keys to their fields, other keys websockets takes to `passthrough`; the rest stay, for
        extra="forbid" to refuse by name."""
        if not isinstance(value, dict) or isinstance(value.get("given"), frozenset):    # sorted already
            return value
        typed = set(typed_keys())
        accepted = websockets_connect_parameters() - CONNECTOR_OWNED
        known = {k: v for k, v in value.items() if k in typed or k not in accepted}
        passthrough = {k: v for k, v in value.items() if k not in known}
        return {**known, "passthrough": passthrough, "given": frozenset(value)}

    def websocket_options(self) -> dict[str, Any]:
        """The options the user gave, as websockets' connect() keywords."""
        options = dict(self.passthrough)
        for key in self.given:
            if key in OWN_KEYS or key in self.passthrough:
                continue
            name = ALIASES.get(key, key)
            options[name] = getattr(self, name)
        return options


def typed_keys() -> list[str]:
    return [n for n in ConnectOptions.model_fields if n not in ("passthrough", "given")] + list(ALIASES)


def connect_option_names() -> list[str]:
    """What connectKWArgs may hold, for the message that refuses an unknown key."""
    return sorted(set(typed_keys()) | (websockets_connect_parameters() - CONNECTOR_OWNED))


def unknown_option(key: str) -> str:
    """The problem of a connectKWArgs key neither the connector nor websockets knows."""
    meant = suggestion(key, connect_option_names())
    if meant:
        return f"is not an option of the connector's websocket: did you mean `{meant}`?"
    return ("is not an option of the connector's websocket; known: "
            + ", ".join(connect_option_names()))

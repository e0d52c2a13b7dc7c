"""`connector_connection`: the upstream API that user code calls, on the connector's side."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .errors import QueryError
from .reply import ConnectorAPIError, QueryContext


def channel_of(ctx: Any):
    channel = getattr(ctx, "channel", None)
    if not isinstance(ctx, QueryContext) or channel is None:
        raise ConnectorAPIError("the context must be the connector_context given to the code")
    return channel


def error_from_message(message: Any) -> QueryError:
    if not isinstance(message, dict) or any(
            message.get(k) is None for k in ("messageCode", "messageTemplate", "parameters")):
        raise ConnectorAPIError("send_query_error: the message needs messageCode, messageTemplate and parameters")
    return QueryError(message["messageCode"], message["messageTemplate"], message["parameters"])


class Health:
    """The health a script or the operator declared (None: nothing declared yet)."""

    def __init__(self) -> None:
        self.declared: bool | None = None
        self.listeners: list[Callable[[bool], Awaitable[None]]] = []

    async def declare(self, healthy: bool) -> None:
        self.declared = healthy
        for listener in self.listeners:
            await listener(healthy)


class ConnectorConnection:
    """The object user code knows as `connector_connection` (inline engine)."""

    def __init__(self, source_name: str, send: Callable[[str], None], drained: Callable[[], Awaitable[None]],
                 notification: Callable[[Any], str], server_config: dict[str, str], health: Health):
        self._source_name = source_name
        self._send = send
        self._drained = drained
        self._notification = notification
        self._server_config = server_config
        self._health = health

    async def send_query_response(self, ctx: Any, code: int, message: Any) -> None:
        channel_of(ctx).send(code, message)
        await self._drained()

    async def send_query_error(self, ctx: Any, message: Any) -> None:
        channel_of(ctx).error(error_from_message(message))
        await self._drained()

    async def send_notification(self, message: Any) -> None:
        self._send(self._notification(message))
        await self._drained()

    def get_source(self) -> str:
        return self._source_name

    def get_server_config(self) -> dict[str, str]:
        """server.config as a dict, without authToken: user code never sees the token."""
        return dict(self._server_config)

    async def declare_healthy(self) -> None:
        await self._health.declare(True)

    async def declare_unhealthy(self) -> None:
        await self._health.declare(False)

    def is_healthy(self) -> bool | None:
        return self._health.declared

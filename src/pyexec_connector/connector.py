"""The Connector: one SourceSession per source, started and stopped together. The lifecycle lives here."""
from __future__ import annotations

import asyncio
import logging
import uuid

from .config import ServerConfig
from .connection import Health
from .link import Backoff
from .session import SourceSession

log = logging.getLogger(__name__)


class Connector:
    def __init__(self, config: ServerConfig, *, backoff_initial: float = 1.0, backoff_max: float = 60.0,
                 handshake_timeout: float | None = None):
        self.config = config
        self.health = Health()
        secret = config.reconnect_secret or uuid.uuid4().hex
        self.sessions: dict[str, SourceSession] = {
            name: SourceSession(name, config, reconnect_secret=secret, health=self.health,
                                backoff=Backoff(backoff_initial, backoff_max),
                                handshake_timeout=handshake_timeout)
            for name in config.sources
        }
        self._stop = asyncio.Event()
        self._closed = False

    async def run(self) -> None:
        """Serve every source until `stop()`. A fatal link error (bad token, failOnConnectionError)
        stops the rest and is raised."""
        log.info("connecting %d source(s) to %s: %s", len(self.sessions), self.config.websocket_url,
                 ", ".join(self.sessions))
        links = {asyncio.create_task(s.run(), name=f"source-{n}"): n for n, s in self.sessions.items()}
        stopper = asyncio.create_task(self._stop.wait())
        try:
            pending = set(links) | {stopper}
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not stopper and task.exception() is not None:
                        raise task.exception()
                if stopper in done or not (pending - {stopper}):
                    return
        finally:
            stopper.cancel()
            await self.close()
            for task in links:
                task.cancel()
            await asyncio.gather(*links, return_exceptions=True)

    def stop(self) -> None:
        self._stop.set()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every source is connected and configured."""
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(s.link.wait_ready() for s in self.sessions.values()))

    @property
    def ready(self) -> bool:
        return all(s.link.ready for s in self.sessions.values())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(s.close() for s in self.sessions.values()), return_exceptions=True)

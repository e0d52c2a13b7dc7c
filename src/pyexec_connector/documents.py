"""Python scripts stored as Vantiq documents, fetched over REST with aiohttp."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin, urlsplit

from cachetools import LRUCache

from . import errors
from .errors import QueryError

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

DEFAULT_FETCH_TIMEOUT = 60.0      # seconds for each request (documentTimeout in server.config)
DEFAULT_MAX_DOCUMENT_BYTES = 64 * 1024 * 1024   # maxDocumentBytes in server.config


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    text: str
    modified: Any      # ars_modifiedAt, else ars_createdAt: the cache fingerprint


class DocumentStore:
    """Fetches scripts, skipping the download while the cached copy's modification time is current.
    One aiohttp session per source, closed with `close()`. aiohttp is imported on the first fetch: a
    connector that never runs a script does not carry it (about 10 MB of RSS)."""

    def __init__(self, rest_base: str, token: str, *, ssl: Any = None, cache_capacity: int = 128,
                 timeout: float = DEFAULT_FETCH_TIMEOUT, max_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES):
        self._base = rest_base.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._ssl = ssl
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._session: aiohttp.ClientSession | None = None
        self.sessions_opened = 0     # HTTP sessions made: one per store while it is open (a metric for tests)
        self._texts: LRUCache[str, Script] = LRUCache(maxsize=cache_capacity)
        self.fetches = 0        # document metadata requests
        self.downloads = 0      # content downloads

    def reconfigure(self, cache_capacity: int) -> None:
        self._texts = LRUCache(maxsize=cache_capacity)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            import aiohttp
            self.sessions_opened += 1
            self._session = aiohttp.ClientSession(headers=self._headers,
                                                  timeout=aiohttp.ClientTimeout(total=self._timeout))
        return self._session

    @property
    def session_open(self) -> bool:
        """Whether the store holds an open HTTP session (close() closes it)."""
        return self._session is not None and not self._session.closed

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, name: str, *, force: bool = False) -> Script:
        """The script `name`: metadata always, content only when it changed (or `force`)."""
        try:
            path = quote(name, safe="")
        except UnicodeEncodeError:     # a lone surrogate: no URL can name it
            raise QueryError(errors.DOC_FETCH, "The document name {0} is not valid Unicode text.",
                             [name]) from None
        meta = await self._request_json(f"{self._base}/api/v1/resources/documents/{path}", name)
        self.fetches += 1
        if not isinstance(meta, dict):
            raise QueryError(errors.DOC_FETCH, "The document {0} has unexpected metadata.", [name])
        if meta.get("isIncomplete"):
            raise QueryError(errors.DOC_INCOMPLETE, "The document {0} is incomplete (still uploading?).", [name])
        modified = meta.get("ars_modifiedAt") or meta.get("ars_createdAt")
        cached = self._texts.get(name)
        if not force and cached is not None and modified is not None and cached.modified == modified:
            return cached
        content = meta.get("content")
        if not isinstance(content, str) or not content:
            raise QueryError(errors.DOC_INCOMPLETE, "The document {0} has no content reference.", [name])
        expected = meta.get("contentSize")
        if not isinstance(expected, int) or isinstance(expected, bool) or expected < 0:
            expected = None
        # never read more than the metadata promised (plus one byte, to notice a longer body)
        raw = await self._download(self._content_url(content, name), name, expected)
        if expected is not None and expected != len(raw):
            raise QueryError(errors.DOC_LENGTH,
                             "The document {0} should hold {1} bytes but {2} arrived.", [name, expected, len(raw)])
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            raise QueryError(errors.DOC_EMPTY, "The document {0} is empty.", [name])
        script = Script(name, text, modified)
        self.downloads += 1
        if modified is not None:
            self._texts[name] = script
        return script

    def _content_url(self, content: str, name: str) -> str:
        url = urljoin(self._base + "/", content.lstrip("/")) if not content.startswith("http") else content
        if urlsplit(url).netloc != urlsplit(self._base).netloc:
            # The bearer token goes only to the server it belongs to.
            raise QueryError(errors.DOC_FETCH, "The document {0} points at another host: {1}", [name, content])
        return url

    async def _request_json(self, url: str, name: str) -> Any:
        raw = await self._download(url, name)
        try:
            return json.loads(raw)
        except ValueError:
            raise QueryError(errors.DOC_FETCH, "The server's answer for the document {0} is not JSON.",
                             [name]) from None

    async def _download(self, url: str, name: str, expected: int | None = None) -> bytes:
        """The body, read up to maxDocumentBytes (and up to one byte past `expected`, when known)."""
        import aiohttp
        limit = self._max_bytes if expected is None else min(self._max_bytes, expected)
        try:
            async with self._client().get(url, ssl=self._ssl) as response:
                body = await _read_at_most(response.content, limit + 1)
                if response.status >= 300:
                    raise _server_error(response.status, body, name)
                if len(body) > self._max_bytes:
                    raise QueryError(errors.DOC_LENGTH, "The document {0} is larger than {1} bytes "
                                                        "(maxDocumentBytes).", [name, self._max_bytes])
                return body
        except QueryError:
            raise
        except TimeoutError:
            log.warning("fetching document %s timed out", name)
            raise QueryError(errors.DOC_FETCH, "Fetching the document {0} failed: no answer within {1} s "
                                               "(documentTimeout).", [name, self._timeout]) from None
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("fetching document %s failed: %s", name, type(exc).__name__)
            raise QueryError(errors.DOC_FETCH, "Fetching the document {0} failed: {1}",
                             [name, f"{type(exc).__name__}: {exc}"]) from None


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """Up to `limit` bytes of the body: StreamReader.read(n) returns after one chunk, so loop."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _server_error(status: int, body: bytes, name: str) -> QueryError:
    """The server's own error code and message: [{"code", "message", "params"}]."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    first = parsed[0] if isinstance(parsed, list) and parsed else parsed
    if isinstance(first, dict) and first.get("code"):
        params = first.get("params")
        return QueryError(str(first["code"]), str(first.get("message") or ""),
                          params if isinstance(params, list) else [])
    return QueryError(errors.DOC_FETCH, "Fetching the document {0} failed with HTTP status {1}.", [name, status])

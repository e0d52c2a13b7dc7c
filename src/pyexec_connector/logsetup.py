"""Logging set-up: serverConfig/logger.ini when present, else text or JSON lines on stdout."""
from __future__ import annotations

import json
import logging
import logging.config
import sys
from datetime import UTC, datetime
from pathlib import Path

from . import logqueue
from .configfile import LOGGER_INI

DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")
# Structured fields a record may carry (passed as `extra=` where a query ends), copied into JSON lines.
STRUCTURED_FIELDS = ("source", "replyAddress", "duration", "outcome", "status", "messageCode")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the structured
    fields when the record has them (source, replyAddress, duration, outcome, status, messageCode)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in STRUCTURED_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def configure_logging(level: str | None = None, logger_ini: Path | None = None, log_format: str = "text") -> str:
    """Returns what configured logging, for the start-up line. logger.ini, when present, wins over
    `log_format`. The handlers end up behind a log pump (see logqueue): call logqueue.stop() before exit."""
    ini = logger_ini if logger_ini is not None else LOGGER_INI
    if ini.is_file():
        logging.config.fileConfig(ini, disable_existing_loggers=False)
        source = str(ini) + (f" (it wins over --log-format {log_format})" if log_format != "text" else "")
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(DEFAULT_FORMAT))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        source = f"default ({log_format} on stdout)"
    if level:
        logging.getLogger().setLevel(level.upper())
    # websockets and aiohttp are chatty at DEBUG; they stay at INFO unless asked for by name in logger.ini
    for noisy in ("websockets", "aiohttp.access"):
        if logging.getLogger(noisy).level == logging.NOTSET:
            logging.getLogger(noisy).setLevel(logging.INFO)
    logqueue.install()      # writing a line must never block the event loop (a stalled stdout)
    return source


# Below this length a secret is not looked for in log text: "x" would turn "pyexec-connector" into
# "pye***ec-connector". Such a secret is safe anyway: no log call is ever given the token (the DEBUG
# sweep in tests/test_secrets.py runs without these filters to prove it); they are a second line only.
MIN_REDACTED_LENGTH = 8


def secret_pieces(secret: str, width: int = MIN_REDACTED_LENGTH) -> tuple[str, ...]:
    """The secret and every `width`-character piece of it: what a line cut short could still show.
    Nothing for a secret shorter than MIN_REDACTED_LENGTH."""
    if len(secret) < MIN_REDACTED_LENGTH:
        return ()
    if len(secret) <= width:
        return (secret,)
    return tuple({secret[i:i + width] for i in range(len(secret) - width + 1)})


class RedactingFilter(logging.Filter):
    """Replaces a secret in every record a handler emits: the last line of defence for the token. A line
    holding only a piece of it (a frame cut short by a library's log) is withheld whole."""

    def __init__(self, secret: str):
        super().__init__()
        self._secret = secret if len(secret) >= MIN_REDACTED_LENGTH else ""
        self._pieces = secret_pieces(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secret:
            return True
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        if self._secret in text:
            text = text.replace(self._secret, "***")
            record.msg, record.args = text, None
        if any(piece in text for piece in self._pieces):
            record.msg, record.args = "(log line withheld: it holds part of the access token)", None
        if record.exc_info and self._secret in logging.Formatter().formatException(record.exc_info):
            record.exc_info = None
            record.exc_text = None
        return True


def redact_everywhere(secret: str) -> None:
    """Attach a RedactingFilter to every handler of the root logger."""
    flt = RedactingFilter(secret)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)

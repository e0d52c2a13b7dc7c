"""Logging set-up: serverConfig/logger.ini when present, else a plain format on stdout."""
from __future__ import annotations

import logging
import logging.config
import sys
from pathlib import Path

from .config import LOGGER_INI

DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | None = None, logger_ini: Path | None = None) -> str:
    """Returns what configured logging, for the start-up line."""
    ini = logger_ini if logger_ini is not None else LOGGER_INI
    if ini.is_file():
        logging.config.fileConfig(ini, disable_existing_loggers=False)
        source = str(ini)
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(DEFAULT_FORMAT))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        source = "default (stdout)"
    if level:
        logging.getLogger().setLevel(level.upper())
    # websockets and aiohttp are chatty at DEBUG; they stay at INFO unless asked for by name in logger.ini
    for noisy in ("websockets", "aiohttp.access"):
        if logging.getLogger(noisy).level == logging.NOTSET:
            logging.getLogger(noisy).setLevel(logging.INFO)
    return source


class RedactingFilter(logging.Filter):
    """Replaces a secret in every record a handler emits: the last line of defence for the token."""

    def __init__(self, secret: str):
        super().__init__()
        self._secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secret:
            return True
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        if self._secret in text:
            record.msg = text.replace(self._secret, "***")
            record.args = None
        if record.exc_info and self._secret in logging.Formatter().formatException(record.exc_info):
            record.exc_info = None
            record.exc_text = None
        return True


def redact_everywhere(secret: str) -> None:
    """Attach a RedactingFilter to every handler of the root logger."""
    flt = RedactingFilter(secret)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)

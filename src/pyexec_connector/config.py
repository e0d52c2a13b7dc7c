"""Start-up configuration (server.config + environment) and per-source configuration, parsed once
into frozen, typed objects."""
from __future__ import annotations

import json
import logging
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import javaproperties
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_LOCATIONS = (Path("serverConfig") / "server.config", Path("server.config"))
LOGGER_INI = Path("serverConfig") / "logger.ini"
TOKEN_ENV = "CONNECTOR_AUTH_TOKEN"
TRUE_WORDS = frozenset({"true", "yes", "t", "1", "y", "on"})
FALSE_WORDS = frozenset({"false", "no", "f", "0", "n", "off", ""})
_WSOCK_PATH = re.compile(r"^/api/v\d+/wsock/websocket/?$")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def parse_bool(value: Any, *, name: str) -> bool:
    """Vantiq and properties files send booleans as words too: true/yes/t/1 (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ValueError(f"{name} must be true or false, not {value!r}")


class ServerConfig(BaseModel):
    """What server.config (and the environment) says; frozen after start-up."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    target_server: str = Field(alias="targetServer")
    auth_token: str = Field(alias="authToken", repr=False)
    sources: tuple[str, ...]
    send_pings: bool = Field(default=False, alias="sendPings")
    fail_on_connection_error: bool = Field(default=False, alias="failOnConnectionError")
    tcp_probe_port: int = Field(default=8000, alias="tcpProbePort", ge=0, le=65535)
    connect_kwargs: dict[str, Any] = Field(default_factory=dict, alias="connectKWArgs")
    reconnect_secret: str | None = Field(default=None, alias="reconnectSecret")
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, alias="maxMessageBytes", ge=1024)
    # Everything the file said, minus the token: what user code sees through get_server_config().
    public_properties: dict[str, str] = Field(default_factory=dict, exclude=True)

    @field_validator("target_server")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme.lower() not in ("http", "https", "ws", "wss") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL such as https://dev.vantiq.com, not {value!r}")
        try:
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError as exc:
            raise ValueError(f"has a malformed port: {value!r}") from exc
        return value.strip()

    @field_validator("auth_token")
    @classmethod
    def _check_token(cls, value: str) -> str:
        if not value or not value.strip():
            raise ValueError(f"is empty (set authToken or the environment variable {TOKEN_ENV})")
        return value.strip()

    @field_validator("sources", mode="before")
    @classmethod
    def _split_sources(cls, value: Any) -> tuple[str, ...]:
        names = value.split(",") if isinstance(value, str) else list(value)
        names = [str(n).strip() for n in names if str(n).strip()]
        if not names:
            raise ValueError("must name at least one source (comma-separated)")
        if len(set(names)) != len(names):
            raise ValueError("names a source twice")
        return tuple(names)

    @field_validator("send_pings", "fail_on_connection_error", mode="before")
    @classmethod
    def _bools(cls, value: Any, info) -> bool:
        return parse_bool(value, name=info.field_name)

    @field_validator("connect_kwargs", mode="before")
    @classmethod
    def _kwargs(cls, value: Any) -> dict[str, Any]:
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"must be a JSON object: {exc.msg} at column {exc.colno}") from exc
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object such as {\"disableSslVerification\": true}")
        return value

    # ---- derived values -------------------------------------------------------------------
    @property
    def websocket_url(self) -> str:
        parts = urlsplit(self.target_server)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower(), parts.scheme.lower())
        path = parts.path if _WSOCK_PATH.match(parts.path or "") else "/api/v1/wsock/websocket"
        return urlunsplit((scheme, parts.netloc, path, "", ""))

    @property
    def rest_base(self) -> str:
        parts = urlsplit(self.target_server)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
        return urlunsplit((scheme, parts.netloc, "", "", ""))

    @property
    def verify_tls(self) -> bool:
        return not parse_bool(self.connect_kwargs.get("disableSslVerification", False),
                              name="connectKWArgs.disableSslVerification")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for wss/https, or None for plain connections."""
        if urlsplit(self.websocket_url).scheme != "wss":
            return None
        ctx = ssl.create_default_context()
        cafile = self.connect_kwargs.get("caFile")
        if cafile:
            ctx.load_verify_locations(cafile=cafile)
        if not self.verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


_OWN_CONNECT_KEYS = {"disableSslVerification", "caFile"}
# websockets' asyncio connect() options a user may pass through connectKWArgs.
_PASSTHROUGH_CONNECT_KEYS = {
    "open_timeout", "close_timeout", "ping_interval", "ping_timeout", "max_size", "max_queue",
    "write_limit", "compression", "user_agent_header", "origin", "additional_headers", "proxy",
}
_CONNECT_ALIASES = {"extra_headers": "additional_headers"}


def websocket_options(config: ServerConfig) -> dict[str, Any]:
    """connectKWArgs translated to websockets' connect() options (unknown keys were refused at load)."""
    options: dict[str, Any] = {}
    for key, value in config.connect_kwargs.items():
        if key in _OWN_CONNECT_KEYS:
            continue
        options[_CONNECT_ALIASES.get(key, key)] = value
    return options


def _check_connect_keys(kwargs: Mapping[str, Any], file: str | None) -> None:
    allowed = _OWN_CONNECT_KEYS | _PASSTHROUGH_CONNECT_KEYS | set(_CONNECT_ALIASES)
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(f"unknown option {key!r}; known: {', '.join(sorted(allowed))}",
                              key=f"connectKWArgs.{key}", file=file)


def find_config_file(explicit: str | os.PathLike | None = None) -> Path | None:
    if explicit is not None:
        return Path(explicit)
    for candidate in CONFIG_LOCATIONS:
        if candidate.is_file():
            return candidate
    return None


def read_properties(path: Path) -> dict[str, str]:
    try:
        with path.open("r", encoding="utf-8") as fp:
            return dict(javaproperties.load(fp))
    except FileNotFoundError as exc:
        raise ConfigError("file not found", file=str(path)) from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot be read: {exc}", file=str(path)) from exc


_KEY_FOR_FIELD = {name: (f.alias or name) for name, f in ServerConfig.model_fields.items()}


def build_server_config(properties: Mapping[str, str], env: Mapping[str, str] | None = None,
                        *, file: str | None = None) -> ServerConfig:
    """Validate raw properties (plus the token from the environment) into a ServerConfig."""
    env = os.environ if env is None else env
    values: dict[str, Any] = dict(properties)
    if not values.get("authToken") and env.get(TOKEN_ENV):
        values["authToken"] = env[TOKEN_ENV]
    for required in ("targetServer", "authToken", "sources"):
        if not str(values.get(required, "")).strip():
            hint = f" (or set {TOKEN_ENV})" if required == "authToken" else ""
            raise ConfigError(f"is required{hint}", key=required, file=file)
    values["public_properties"] = {k: v for k, v in properties.items() if k != "authToken"}
    try:
        config = ServerConfig.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        key = _KEY_FOR_FIELD.get(field, field)
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(message, key=key, file=file) from None
    _check_connect_keys(config.connect_kwargs, file)
    return config


def load_server_config(path: str | os.PathLike | None = None,
                       env: Mapping[str, str] | None = None) -> ServerConfig:
    """Find, read and validate server.config. Raises ConfigError naming the file and key."""
    found = find_config_file(path)
    if found is None:
        raise ConfigError("no server.config found (looked in "
                          + ", ".join(str(p) for p in CONFIG_LOCATIONS) + ")")
    return build_server_config(read_properties(found), env, file=str(found))


# ---- per-source configuration (configureExtension) ---------------------------------------------

class SourceConfig(BaseModel):
    """pythonExecConfig.general of the source's configuration document."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    codeCacheSize: int = Field(default=128, ge=1, le=1_000_000)
    returnRuntimeInformation: bool = False


def parse_source_config(document: Any, source_name: str = "?") -> SourceConfig:
    """Every configure is a fresh configuration. Unknown keys: a warning. Wrong types: an error in the
    log and the defaults."""
    section = document.get("pythonExecConfig") if isinstance(document, dict) else None
    if section is None:
        return SourceConfig()
    general = section.get("general") if isinstance(section, dict) else section
    if general is None:
        return SourceConfig()
    if not isinstance(general, dict):
        log.error("source %s: pythonExecConfig.general must be an object, not %s; using the defaults",
                  source_name, type(general).__name__)
        return SourceConfig()
    known = set(SourceConfig.model_fields)
    for key in general:
        if key not in known:
            log.warning("source %s: unknown key pythonExecConfig.general.%s ignored (known: %s)",
                        source_name, key, ", ".join(sorted(known)))
    try:
        return SourceConfig.model_validate({k: v for k, v in general.items() if k in known})
    except ValidationError as exc:
        problems = "; ".join(f"pythonExecConfig.general.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors())
        log.error("source %s: bad configuration (%s); using the defaults", source_name, problems)
        return SourceConfig()

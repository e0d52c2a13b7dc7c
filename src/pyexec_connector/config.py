"""Start-up configuration (server.config + environment) and per-source configuration, parsed once
into frozen, typed objects."""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import javaproperties
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import sandbox
from .booleans import FALSE_WORDS, TRUE_WORDS, parse_bool  # noqa: F401 - re-exported
from .errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_LOCATIONS = (Path("serverConfig") / "server.config", Path("server.config"))
LOGGER_INI = Path("serverConfig") / "logger.ini"
TOKEN_ENV = "CONNECTOR_AUTH_TOKEN"
_WSOCK_PATH = re.compile(r"^/api/v\d+/wsock/websocket/?$")
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$", re.ASCII)
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PENDING_BYTES = 16 * 1024 * 1024     # per source; README "Flow control" says why
DEFAULT_SHUTDOWN_GRACE = 30.0
ENV_PREFIX = "CONNECTOR_"
DEFAULT_MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
# Queries waiting for a worker, per source: room for one frame of the default maxMessageBytes, or ~60,000
# trivial queries (a 5-second burst at 10,000/s even if no worker answered one meanwhile).
DEFAULT_MAX_QUEUED_BYTES = 64 * 1024 * 1024
DEFAULT_DOCUMENT_TIMEOUT = 60.0


@functools.cache
def _websockets_connect_parameters() -> frozenset[str]:
    """Every keyword the installed websockets' asyncio connect() takes, by name: its own, and those it
    hands to loop.create_connection(). Asked of the library itself, so that a key is refused at start
    rather than by a TypeError at every connection attempt (a retry loop with failOnConnectionError off)."""
    import asyncio
    import inspect

    from websockets.asyncio.client import connect

    names = {n for n, p in inspect.signature(connect.__init__).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY}
    names |= {n for n, p in inspect.signature(asyncio.BaseEventLoop.create_connection).parameters.items()
              if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return frozenset(names)


# connect() keywords the connector sets itself (TLS comes from disableSslVerification/caFile), or that
# take Python objects JSON cannot give: not for connectKWArgs.
_CONNECTOR_OWNED = frozenset({"self", "uri", "protocol_factory", "host", "port", "sock", "ssl", "logger",
                              "create_connection", "process_exception", "extensions"})
_CONNECT_ALIASES = {"extra_headers": "additional_headers"}     # websockets' legacy name, as upstream used
_Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ConnectOptions(BaseModel):
    """connectKWArgs: the connector's own TLS keys, then websockets' connect() options, each typed. A key
    neither knows is passed on only when the installed websockets accepts it by name (`passthrough`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    disableSslVerification: bool = False
    caFile: FilePath | None = None
    open_timeout: _Seconds | None = None
    close_timeout: _Seconds | None = None
    ping_interval: _Seconds | None = None
    ping_timeout: _Seconds | None = None
    max_size: Annotated[int, Field(ge=1024)] | None = None
    max_queue: Annotated[int, Field(ge=1)] | tuple[int | None, int | None] | None = None
    write_limit: Annotated[int, Field(ge=0)] | tuple[int, int | None] | None = None
    compression: Literal["deflate"] | None = None
    user_agent_header: str | None = None
    origin: str | None = None
    additional_headers: dict[str, str] | None = Field(default=None, alias="extra_headers")
    proxy: str | Literal[True] | None = None
    subprotocols: list[str] | None = None
    # untyped keys websockets' connect() (or loop.create_connection) accepts by name
    passthrough: dict[str, Any] = Field(default_factory=dict, exclude=True)
    given: frozenset[str] = Field(default_factory=frozenset, exclude=True)   # the keys the user wrote

    @model_validator(mode="before")
    @classmethod
    def _sort_keys(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        typed = {f.alias or n for n, f in cls.model_fields.items()} | set(cls.model_fields)
        typed -= {"passthrough", "given"}
        accepted = _websockets_connect_parameters() - _CONNECTOR_OWNED
        known: dict[str, Any] = {}
        passthrough: dict[str, Any] = {}
        for key, item in value.items():
            if key in typed or key not in accepted:
                known[key] = item            # typed, or refused by extra="forbid" naming the key
            else:
                passthrough[key] = item
        return {**known, "passthrough": passthrough, "given": frozenset(value)}

    @field_validator("disableSslVerification", mode="before")
    @classmethod
    def _bool(cls, value: Any) -> bool:
        return parse_bool(value, name="connectKWArgs.disableSslVerification")

    @model_validator(mode="after")
    def _installed_websockets_takes_them(self) -> ConnectOptions:
        accepted = _websockets_connect_parameters()
        for key in self.websocket_keys():
            if key not in accepted:     # a typed key an older websockets lacks (proxy came in 15.0)
                raise ValueError(f"{key!r} is not an option of the installed websockets "
                                 f"{_websockets_version()}")
        return self

    def websocket_keys(self) -> list[str]:
        return [_CONNECT_ALIASES.get(k, k) for k in self.given if k not in ("disableSslVerification", "caFile")]

    def websocket_options(self) -> dict[str, Any]:
        """The options the user gave, as websockets' connect() keywords."""
        options = dict(self.passthrough)
        for key in self.given:
            if key in ("disableSslVerification", "caFile") or key in self.passthrough:
                continue
            name = _CONNECT_ALIASES.get(key, key)
            options[name] = getattr(self, name)
        return options


def _websockets_version() -> str:
    import websockets
    return str(getattr(websockets, "__version__", "?"))


def connect_option_names() -> list[str]:
    """What connectKWArgs may hold, for the message that refuses an unknown key."""
    typed = {f.alias or n for n, f in ConnectOptions.model_fields.items() if n not in ("passthrough", "given")}
    typed |= {n for n in ConnectOptions.model_fields if n not in ("passthrough", "given")}
    return sorted(typed | (_websockets_connect_parameters() - _CONNECTOR_OWNED))


class ServerConfig(BaseModel):
    """What server.config (and the environment) says; frozen after start-up."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    target_server: str = Field(alias="targetServer")
    auth_token: str = Field(alias="authToken", repr=False)
    sources: tuple[str, ...]
    send_pings: bool = Field(default=False, alias="sendPings")
    fail_on_connection_error: bool = Field(default=False, alias="failOnConnectionError")
    tcp_probe_port: int = Field(default=8000, alias="tcpProbePort", ge=0, le=65535)
    connect_kwargs: ConnectOptions = Field(default_factory=ConnectOptions, alias="connectKWArgs")
    reconnect_secret: str | None = Field(default=None, alias="reconnectSecret")
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, alias="maxMessageBytes", ge=1024)
    # Frames waiting for the websocket, per source; past it, code sending replies waits (flow control).
    max_pending_bytes: int = Field(default=DEFAULT_MAX_PENDING_BYTES, alias="maxPendingBytes", ge=65536)
    max_document_bytes: int = Field(default=DEFAULT_MAX_DOCUMENT_BYTES, alias="maxDocumentBytes", ge=1024)
    document_timeout: float = Field(default=DEFAULT_DOCUMENT_TIMEOUT, alias="documentTimeout", gt=0)
    # HTTP /healthz, /readyz and /metrics; off when absent.
    metrics_port: int | None = Field(default=None, alias="metricsPort", ge=1, le=65535)
    # How long a stopping connector lets in-flight queries finish before answering them with an error.
    shutdown_grace_seconds: float = Field(default=DEFAULT_SHUTDOWN_GRACE, alias="shutdownGraceSeconds", ge=0)
    # The user (name or uid) worker processes run as, with no supplementary groups; and their group
    # (default: that user's primary group). Needs a connector started as root (README, "Threat model").
    worker_user: str | None = Field(default=None, alias="workerUser")
    worker_group: str | None = Field(default=None, alias="workerGroup")
    # Everything the file said, minus the token and the reconnect secret: what user code sees through
    # get_server_config().
    public_properties: dict[str, str] = Field(default_factory=dict, exclude=True)

    @field_validator("worker_user", "worker_group", mode="before")
    @classmethod
    def _optional_name(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("worker_user")
    @classmethod
    def _check_worker_user(cls, value: str | None) -> str | None:
        if value is not None:
            sandbox.check_worker_user(value)
        return value

    @field_validator("worker_group")
    @classmethod
    def _check_worker_group(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            if "worker_user" in info.data and info.data["worker_user"] is None:    # (a bad one is reported)
                raise ValueError("is set without workerUser: set workerUser too, or remove workerGroup")
            sandbox.resolve_group(value)
        return value

    @property
    def worker_credentials(self) -> tuple[int, int] | None:
        """(uid, gid) workers switch to, or None: they run as the connector's user."""
        return sandbox.worker_credentials(self.worker_user, self.worker_group)

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _optional_port(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

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
        return parse_bool(value, name=cls.model_fields[info.field_name].alias or info.field_name)

    @field_validator("connect_kwargs", mode="before")
    @classmethod
    def _kwargs(cls, value: Any) -> Any:
        if isinstance(value, ConnectOptions):
            return value
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
        return not self.connect_kwargs.disableSslVerification

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for wss/https, or None for plain connections."""
        if urlsplit(self.websocket_url).scheme != "wss":
            return None
        ctx = ssl.create_default_context()
        cafile = self.connect_kwargs.caFile
        if cafile is not None:
            ctx.load_verify_locations(cafile=str(cafile))
        if not self.verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def websocket_options(config: ServerConfig) -> dict[str, Any]:
    """connectKWArgs translated to websockets' connect() options (checked at load)."""
    return config.connect_kwargs.websocket_options()


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


_KEY_FOR_FIELD = {name: (f.alias or name) for name, f in ServerConfig.model_fields.items()
                  if name != "public_properties"}
REQUIRED_KEYS = ("targetServer", "authToken", "sources")


def env_name(key: str) -> str:
    """The environment variable for a server.config key: targetServer -> CONNECTOR_TARGET_SERVER,
    connectKWArgs -> CONNECTOR_CONNECT_KW_ARGS."""
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z]|$)|[A-Z]?[a-z0-9]+|[A-Z]+", key)
    return ENV_PREFIX + "_".join(w.upper() for w in words)


ENV_FOR_KEY = {key: env_name(key) for key in _KEY_FOR_FIELD.values()}   # authToken -> CONNECTOR_AUTH_TOKEN


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def merge_environment(properties: Mapping[str, str], env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's properties plus, for each key the file lacks (or leaves empty), the value of its
    CONNECTOR_<KEY> environment variable. Returns (values, {key: variable} for those taken from env)."""
    values: dict[str, Any] = dict(properties)
    from_env: dict[str, str] = {}
    for key, variable in ENV_FOR_KEY.items():
        if _blank(values.get(key)) and not _blank(env.get(variable)):
            values[key] = env[variable]
            from_env[key] = variable
    return values, from_env


def _origin(key: str, from_env: Mapping[str, str], file: str | None) -> str | None:
    return f"environment variable {from_env[key]}" if key in from_env else file


def config_problems(properties: Mapping[str, str], env: Mapping[str, str] | None = None,
                    *, file: str | None = None) -> tuple[ServerConfig | None, list[ConfigError]]:
    """Validate everything and collect every problem at once (a user fixes a file in one go, not one
    line per start), each naming its key and where the value came from (the file or the environment
    variable)."""
    env = os.environ if env is None else env
    values, from_env = merge_environment(properties, env)
    for required in REQUIRED_KEYS:
        if _blank(values.get(required)):
            values.pop(required, None)      # reported as missing, with the variable that could supply it
    values["public_properties"] = {k: str(v) for k, v in values.items() if k not in sandbox.SECRET_KEYS}
    try:
        return ServerConfig.model_validate(values), []
    except ValidationError as exc:
        return None, _problems(exc, from_env, file)


_REQUIRED_FIELDS = {"target_server", "auth_token", "sources", *REQUIRED_KEYS}


def _problems(exc: ValidationError, from_env: Mapping[str, str], file: str | None) -> list[ConfigError]:
    """One ConfigError per key (a union type reports one error per alternative: the first says enough)."""
    by_key: dict[str, ConfigError] = {}
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]] or ["?"]
        top = _KEY_FOR_FIELD.get(loc[0], loc[0])
        key = top if len(loc) == 1 or top != "connectKWArgs" else f"{top}.{loc[1]}"
        if key in by_key:
            continue
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing" and top in REQUIRED_KEYS:
            message = f"is required (or set the environment variable {ENV_FOR_KEY[top]})"
        elif error["type"] == "extra_forbidden":
            message = ("is not an option of the connector or of websockets' connect(); known: "
                       + ", ".join(connect_option_names()))
        elif key.startswith("connectKWArgs.") and _shown(error.get("input")) not in message:
            message += f", not {_shown(error.get('input'))}"
        by_key[key] = ConfigError(message, key=key, file=_origin(top, from_env, file))
    return list(by_key.values())


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def build_server_config(properties: Mapping[str, str], env: Mapping[str, str] | None = None,
                        *, file: str | None = None) -> ServerConfig:
    """Validate raw properties (plus CONNECTOR_* environment variables for keys the file lacks) into a
    ServerConfig. Raises the first ConfigError."""
    config, problems = config_problems(properties, env, file=file)
    if problems:
        raise problems[0]
    assert config is not None
    return config


def read_config_sources(path: str | os.PathLike | None = None,
                        env: Mapping[str, str] | None = None) -> tuple[dict[str, str], str | None]:
    """The properties of server.config (found as `find_config_file` does) and the file's name. With no
    file, empty properties, as long as the environment supplies the required keys."""
    env = os.environ if env is None else env
    found = find_config_file(path)
    if found is None:
        if all(not _blank(env.get(ENV_FOR_KEY[k])) for k in REQUIRED_KEYS):
            return {}, None
        missing = [ENV_FOR_KEY[k] for k in REQUIRED_KEYS if _blank(env.get(ENV_FOR_KEY[k]))]
        raise ConfigError("no server.config found (looked in " + ", ".join(str(p) for p in CONFIG_LOCATIONS)
                          + ") and the environment does not supply it (missing: " + ", ".join(missing) + ")")
    return read_properties(found), str(found)


def load_server_config(path: str | os.PathLike | None = None,
                       env: Mapping[str, str] | None = None) -> ServerConfig:
    """Find, read and validate server.config (or the environment alone). Raises ConfigError naming the
    file (or environment variable) and key."""
    properties, file = read_config_sources(path, env)
    return build_server_config(properties, env, file=file)


# ---- per-source configuration (configureExtension) ---------------------------------------------

class CodeGuardConfig(BaseModel):
    """codeGuard: names, attributes and modules user code may not use (checked on the AST)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    forbid: tuple[str, ...] = ()


class SourceConfig(BaseModel):
    """pythonExecConfig.general of the source's configuration document."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    codeCacheSize: int = Field(default=128, ge=1, le=1_000_000)
    returnRuntimeInformation: bool = False
    # Where user code runs: "process" (a pool of worker processes, protected) or "inline" (the
    # connector's own loop, as upstream; not protected).
    executionMode: Literal["process", "inline"] = "process"
    workers: int | None = Field(default=None, ge=1, le=512)           # the most at once; None: os.cpu_count()
    minWorkers: int = Field(default=1, ge=0, le=512)                 # kept running even when idle
    workerIdleSeconds: float = Field(default=60.0, gt=0)             # a worker beyond minWorkers idle this long ends
    maxQueriesPerWorker: int = Field(default=0, ge=0)                # then it is replaced (±10 %); 0: never
    maxWorkerMemoryMB: int = Field(default=0, ge=0)                  # resident, after a query: replaced; 0: never
    # modules a template process (the zygote) imports once; workers are forked from it with them loaded
    preload: tuple[str, ...] = ()
    queriesPerWorker: int = Field(default=16, ge=1, le=10_000)       # concurrent queries one worker takes
    executionTimeout: float = Field(default=300.0, ge=0)             # seconds; 0: no limit
    memoryLimitMB: int | None = Field(default=None, ge=0)            # address-space limit per worker; 0/None: none
    # Queries waiting for a worker (process mode; README "Flow control"): queued by cost. maxQueuedBytes:
    # their frames' bytes plus ~1 KiB each; beyond it, "busy". maxQueuedQueries: an explicit count cap
    # (None: none; 0: no query waits).
    maxQueuedQueries: int | None = Field(default=None, ge=0)
    maxQueuedBytes: int = Field(default=DEFAULT_MAX_QUEUED_BYTES, ge=0)
    codeGuard: CodeGuardConfig | None = None
    # true: `code` with `script`, and `script` with another `name`, are 400s (ambiguouscode,
    # ambiguousname) instead of upstream's reading of them (run the code; run the script under its name)
    strictParameters: bool = False
    # Which globals a plain query returns: "plain", upstream's rule (what plain JSON encodes; the rest is
    # left out), or "rich": numpy, pandas, datetimes... encoded too (see values.py and the README).
    resultValues: Literal["plain", "rich"] = "plain"
    # RLIMIT_NOFILE of each worker process; RLIMIT_NPROC of the worker user, applied only with
    # workerUser (README, "Threat model" says what each bounds)
    maxOpenFiles: int = Field(default=sandbox.DEFAULT_MAX_OPEN_FILES, ge=16, le=1_048_576)
    maxProcessesPerWorker: int = Field(default=sandbox.DEFAULT_MAX_PROCESSES, ge=8, le=4_194_304)

    @field_validator("minWorkers")
    @classmethod
    def _min_within_max(cls, value: int, info) -> int:
        most = info.data.get("workers")
        if most is not None and value > most:
            raise ValueError(f"must not exceed workers ({most}), the most that may run")
        return value

    @field_validator("preload", mode="before")
    @classmethod
    def _module_names(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ValueError(f"must be a list of module names such as [\"numpy\", \"pandas\"], not {value!r}")
        names: list[str] = []
        for item in value:
            if not isinstance(item, str) or not _MODULE_NAME.match(item.strip()):
                raise ValueError(f"{item!r} is not a module name (such as \"pandas\" or \"mypackage.models\")")
            if item.strip() not in names:
                names.append(item.strip())
        return tuple(names)

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    @property
    def min_worker_count(self) -> int:
        """Workers kept warm: minWorkers, within the most that may run."""
        return min(self.minWorkers, self.worker_count)

    @property
    def pool_shape(self) -> tuple[Any, ...]:
        """What a worker pool is built from: a change here needs a new pool, anything else does not."""
        return (self.executionMode, self.worker_count, self.memoryLimitMB or None, self.maxOpenFiles,
                self.maxProcessesPerWorker, self.preload)


def source_config_problems(document: Any) -> tuple[SourceConfig | None, list[str], list[str]]:
    """What `check` says of a configureExtension document: the configuration (None when it is bad), its
    errors (the connector would log them and use the defaults) and warnings (unknown keys, ignored)."""
    section = document.get("pythonExecConfig") if isinstance(document, dict) else None
    general = section.get("general") if isinstance(section, dict) else section
    if general is None:
        return SourceConfig(), [], []
    if not isinstance(general, dict):
        return None, [f"pythonExecConfig.general must be an object, not {type(general).__name__}"], []
    known = set(SourceConfig.model_fields)
    warnings = [f"unknown key pythonExecConfig.general.{key} ignored (known: {', '.join(sorted(known))})"
                for key in general if key not in known]
    try:
        return SourceConfig.model_validate({k: v for k, v in general.items() if k in known}), [], warnings
    except ValidationError as exc:
        return None, [f"pythonExecConfig.general.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                      for e in exc.errors()], warnings


def parse_source_config(document: Any, source_name: str = "?") -> SourceConfig:
    """Every configure is a fresh configuration. Unknown keys: a warning. Wrong types: an error in the
    log and the defaults."""
    config, errors, warnings = source_config_problems(document)
    for warning in warnings:
        log.warning("source %s: %s", source_name, warning)
    if config is None:
        log.error("source %s: bad configuration (%s); using the defaults", source_name, "; ".join(errors))
        return SourceConfig()
    return config

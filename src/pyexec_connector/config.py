"""Start-up configuration (server.config + environment) and per-source configuration, parsed once
into frozen, typed objects.

Each key is a dataclass field whose metadata names the key and the function that turns what the file,
the environment or the configuration document gave into the field's value (raising `Invalid` with a
message that reads after the key's name). `_parse` applies them all and collects every problem, so a
user fixes a file in one go. No validation library: the keys are plain numbers, words and names, and
pydantic, which this module used before, was a sixth of the connector's memory (docs/PERFORMANCE.md)."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jprops

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


# ---- values ------------------------------------------------------------------------------------

class Invalid(ValueError):
    """A value a key cannot take. The message reads after the key's name: "must be at least 1, not 0"."""


class KeyProblems(Invalid):
    """Problems of a key's own keys (connectKWArgs.open_timeout...), each reported on its own."""

    def __init__(self, problems: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in problems.items()))
        self.problems = problems


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounded(number: Any, ge: float | None, gt: float | None, le: float | None, original: Any) -> Any:
    # written so that NaN fails every bound
    if ge is not None and not number >= ge:
        raise Invalid(f"must be at least {ge:g}, not {_shown(original)}")
    if gt is not None and not number > gt:
        raise Invalid(f"must be greater than {gt:g}, not {_shown(original)}")
    if le is not None and not number <= le:
        raise Invalid(f"must be at most {le:g}, not {_shown(original)}")
    return number


def _from_text(value: str, parse: Callable[[str], Any]) -> Any:
    """What `parse` makes of the text, or None when it cannot (properties files hold only text)."""
    try:
        return parse(value.strip())
    except ValueError:
        return None


def integer(value: Any, *, ge: int | None = None, le: int | None = None) -> int:
    """An integer: a JSON number without a fraction, or its text."""
    number: Any = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        number = _from_text(value, int)
    if number is None:
        raise Invalid(f"must be a whole number, not {_shown(value)}")
    return _bounded(number, ge, None, le, value)


def number(value: Any, *, ge: float | None = None, gt: float | None = None, finite: bool = False) -> float:
    """A number (a JSON number or its text), as a float."""
    result: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
    elif isinstance(value, str):
        result = _from_text(value, float)
    if result is None or (finite and not math.isfinite(result)):
        raise Invalid(f"must be a {'finite ' if finite else ''}number, not {_shown(value)}")
    return _bounded(result, ge, gt, None, value)


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string, not {_shown(value)}")
    return value


def choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise Invalid(f"must be {' or '.join(repr(c) for c in choices)}, not {_shown(value)}")
        return value
    return convert


def boolean(value: Any, name: str) -> bool:
    try:
        return parse_bool(value, name=name)
    except ValueError:
        raise Invalid(f"must be true or false, not {_shown(value)}") from None


def optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`convert`, or None for JSON null."""
    return lambda value: None if value is None else convert(value)


def text_list(value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"must be a list of strings, not {_shown(value)}")
    return list(value)


def text_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise Invalid(f"must be an object of strings, such as {{\"X-Header\": \"value\"}}, not {_shown(value)}")
    return dict(value)


def setting(name: str, convert: Callable[[Any], Any], default: Any = dataclasses.MISSING, *,
            factory: Callable[[], Any] | None = None, repr: bool = True) -> Any:
    """A dataclass field read from the configuration key `name` through `convert`."""
    meta = {"key": name, "convert": convert}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta, repr=repr)
    return dataclasses.field(default=default, metadata=meta, repr=repr)


def _keys(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """{configuration key: field} of a configuration class."""
    return {f.metadata["key"]: f for f in dataclasses.fields(cls) if "key" in f.metadata}


def _parse(cls: type, values: Mapping[str, Any], extra: Mapping[str, Any] | None = None
           ) -> tuple[Any, dict[str, str]]:
    """(instance or None, {key: problem}) from `values` by configuration key; keys it does not have are
    ignored, missing ones take their defaults (or are reported, when required). `cls.cross_check`, if
    any, then sees the values that converted: a check across keys is made only when those are good."""
    converted: dict[str, Any] = dict(extra or {})
    problems: dict[str, str] = {}
    for name, f in _keys(cls).items():
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems[name] = "is required"
            continue
        try:
            converted[f.name] = f.metadata["convert"](values[name])
        except KeyProblems as exc:
            problems.update({f"{name}.{sub}": problem for sub, problem in exc.problems.items()})
        except ValueError as exc:        # Invalid, or a check in another module (a user name, a group)
            problems[name] = str(exc)
    check = getattr(cls, "cross_check", None)
    if check is not None:
        problems.update({k: v for k, v in check(converted, set(problems)).items() if k not in problems})
    if problems:
        return None, problems
    return cls(**converted), {}


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
_seconds = optional(functools.partial(number, gt=0, finite=True))


def _ca_file(value: Any) -> Path:
    path = Path(text(value))
    if not path.is_file():
        raise Invalid(f"names no file: {_shown(value)}")
    return path


def _queue(value: Any) -> int | tuple[int | None, int | None]:
    """max_queue: a count, or websockets' (high, low) pair."""
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise Invalid(f"must be a number or a pair [high, low], not {_shown(value)}")
        high, low = (None if v is None else integer(v, ge=0) for v in value)
        return high, low
    return integer(value, ge=1)


def _write_limit(value: Any) -> int | tuple[int, int | None]:
    """write_limit: a byte count, or websockets' (high, low) pair."""
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] is None:
            raise Invalid(f"must be a number or a pair [high, low], not {_shown(value)}")
        return integer(value[0], ge=0), None if value[1] is None else integer(value[1], ge=0)
    return integer(value, ge=0)


def _proxy(value: Any) -> str | bool:
    if value is True or isinstance(value, str):
        return value
    raise Invalid(f"must be a proxy URL or true (the environment's proxy), not {_shown(value)}")


@dataclasses.dataclass(frozen=True)
class ConnectOptions:
    """connectKWArgs: the connector's own TLS keys, then websockets' connect() options, each typed. A key
    neither knows is passed on only when the installed websockets accepts it by name (`passthrough`)."""

    disableSslVerification: bool = setting(
        "disableSslVerification", functools.partial(boolean, name="connectKWArgs.disableSslVerification"), False)
    caFile: Path | None = setting("caFile", optional(_ca_file), None)
    open_timeout: float | None = setting("open_timeout", _seconds, None)
    close_timeout: float | None = setting("close_timeout", _seconds, None)
    ping_interval: float | None = setting("ping_interval", _seconds, None)
    ping_timeout: float | None = setting("ping_timeout", _seconds, None)
    max_size: int | None = setting("max_size", optional(functools.partial(integer, ge=1024)), None)
    max_queue: int | tuple[int | None, int | None] | None = setting("max_queue", optional(_queue), None)
    write_limit: int | tuple[int, int | None] | None = setting("write_limit", optional(_write_limit), None)
    compression: str | None = setting("compression", optional(choice("deflate")), None)
    user_agent_header: str | None = setting("user_agent_header", optional(text), None)
    origin: str | None = setting("origin", optional(text), None)
    additional_headers: dict[str, str] | None = setting("additional_headers", optional(text_map), None)
    proxy: str | bool | None = setting("proxy", optional(_proxy), None)
    subprotocols: list[str] | None = setting("subprotocols", optional(text_list), None)
    # untyped keys websockets' connect() (or loop.create_connection) accepts by name
    passthrough: dict[str, Any] = dataclasses.field(default_factory=dict)
    given: frozenset[str] = frozenset()      # the keys the user wrote

    @classmethod
    def parse(cls, value: Mapping[str, Any]) -> tuple[ConnectOptions | None, dict[str, str]]:
        """(options or None, {key as the user wrote it: problem})."""
        typed = _keys(cls)
        accepted = _websockets_connect_parameters() - _CONNECTOR_OWNED
        known: dict[str, Any] = {}
        passthrough: dict[str, Any] = {}
        problems: dict[str, str] = {}
        for name, item in value.items():
            field_name = _CONNECT_ALIASES.get(name, name)
            if field_name in typed:
                known[field_name] = item
            elif name in accepted:
                passthrough[name] = item
            else:
                problems[name] = ("is not an option of the connector or of websockets' connect(); known: "
                                  + ", ".join(connect_option_names()))
        options, typed_problems = _parse(cls, known, {"passthrough": passthrough, "given": frozenset(value)})
        aliased = {_CONNECT_ALIASES.get(n, n): n for n in value}     # reported under the name written
        problems.update({aliased.get(k, k): v for k, v in typed_problems.items()})
        installed = _websockets_connect_parameters()
        for name in known.keys() - {"disableSslVerification", "caFile"}:
            if name not in installed:     # a typed key an older websockets lacks (proxy came in 15.0)
                problems.setdefault(aliased.get(name, name),
                                    f"is not an option of the installed websockets {_websockets_version()}")
        return (None, problems) if problems else (options, {})

    def websocket_options(self) -> dict[str, Any]:
        """The options the user gave, as websockets' connect() keywords."""
        options = dict(self.passthrough)
        for name in self.given:
            if name in ("disableSslVerification", "caFile") or name in self.passthrough:
                continue
            name = _CONNECT_ALIASES.get(name, name)
            options[name] = getattr(self, name)
        return options


def _websockets_version() -> str:
    import websockets
    return str(getattr(websockets, "__version__", "?"))


def connect_option_names() -> list[str]:
    """What connectKWArgs may hold, for the message that refuses an unknown key."""
    typed = set(_keys(ConnectOptions)) | set(_CONNECT_ALIASES)
    return sorted(typed | (_websockets_connect_parameters() - _CONNECTOR_OWNED))


def _target_server(value: Any) -> str:
    value = text(value).strip()
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise Invalid(f"must be an http(s) URL such as https://dev.vantiq.com, not {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise Invalid(f"has a malformed port: {value!r}") from None
    return value


def _auth_token(value: Any) -> str:
    value = text(value).strip()
    if not value:
        raise Invalid(f"is empty (set authToken or the environment variable {TOKEN_ENV})")
    return value


def _sources(value: Any) -> tuple[str, ...]:
    if not isinstance(value, str | list | tuple):
        raise Invalid(f"must be source names, comma-separated, not {_shown(value)}")
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise Invalid("must name at least one source (comma-separated)")
    if len(set(names)) != len(names):
        raise Invalid("names a source twice")
    return tuple(names)


def _connect_kwargs(value: Any) -> ConnectOptions:
    """JSON text (as a properties file holds it) or an object. Its own keys' problems are reported
    one by one, under connectKWArgs.<key> (`KeyProblems`, taken apart by `_parse`)."""
    if isinstance(value, ConnectOptions):
        return value
    if isinstance(value, str):
        if not value.strip():
            value = {}
        else:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise Invalid(f"must be a JSON object: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise Invalid("must be a JSON object such as {\"disableSslVerification\": true}")
    options, problems = ConnectOptions.parse(value)
    if options is None:
        raise KeyProblems(problems)
    return options


def _blank_is_none(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None or (isinstance(value, str) and not value.strip()) else convert(value)


def _worker_user(value: Any) -> str:
    sandbox.check_worker_user(text(value))
    return value


def _worker_group(value: Any) -> str:
    sandbox.resolve_group(text(value))
    return value


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What server.config (and the environment) says; frozen after start-up."""

    target_server: str = setting("targetServer", _target_server)
    auth_token: str = setting("authToken", _auth_token, repr=False)
    sources: tuple[str, ...] = setting("sources", _sources)
    send_pings: bool = setting("sendPings", functools.partial(boolean, name="sendPings"), False)
    fail_on_connection_error: bool = setting("failOnConnectionError",
                                             functools.partial(boolean, name="failOnConnectionError"), False)
    tcp_probe_port: int = setting("tcpProbePort", functools.partial(integer, ge=0, le=65535), 8000)
    connect_kwargs: ConnectOptions = setting("connectKWArgs", _connect_kwargs, factory=ConnectOptions)
    reconnect_secret: str | None = setting("reconnectSecret", optional(text), None, repr=False)
    max_message_bytes: int = setting("maxMessageBytes", functools.partial(integer, ge=1024), DEFAULT_MAX_MESSAGE_BYTES)
    # Frames waiting for the websocket, per source; past it, code sending replies waits (flow control).
    max_pending_bytes: int = setting("maxPendingBytes", functools.partial(integer, ge=65536), DEFAULT_MAX_PENDING_BYTES)
    max_document_bytes: int = setting("maxDocumentBytes", functools.partial(integer, ge=1024),
                                      DEFAULT_MAX_DOCUMENT_BYTES)
    document_timeout: float = setting("documentTimeout", functools.partial(number, gt=0), DEFAULT_DOCUMENT_TIMEOUT)
    # HTTP /healthz, /readyz and /metrics; off when absent.
    metrics_port: int | None = setting("metricsPort", _blank_is_none(functools.partial(integer, ge=1, le=65535)), None)
    # How long a stopping connector lets in-flight queries finish before answering them with an error.
    shutdown_grace_seconds: float = setting("shutdownGraceSeconds", functools.partial(number, ge=0),
                                            DEFAULT_SHUTDOWN_GRACE)
    # The user (name or uid) worker processes run as, with no supplementary groups; and their group
    # (default: that user's primary group). Needs a connector started as root (README, "Threat model").
    worker_user: str | None = setting("workerUser", _blank_is_none(_worker_user), None)
    worker_group: str | None = setting("workerGroup", _blank_is_none(_worker_group), None)
    # Everything the file said, minus the token and the reconnect secret: what user code sees through
    # get_server_config().
    public_properties: dict[str, str] = dataclasses.field(default_factory=dict)

    @staticmethod
    def cross_check(values: Mapping[str, Any], failed: set[str]) -> dict[str, str]:
        if values.get("worker_group") is not None and values.get("worker_user") is None \
                and "workerUser" not in failed:
            return {"workerGroup": "is set without workerUser: set workerUser too, or remove workerGroup"}
        return {}

    @classmethod
    def keys(cls) -> list[str]:
        """Every key server.config (or the environment) may set."""
        return list(_keys(cls))

    @property
    def worker_credentials(self) -> tuple[int, int] | None:
        """(uid, gid) workers switch to, or None: they run as the connector's user."""
        return sandbox.worker_credentials(self.worker_user, self.worker_group)

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
            return dict(jprops.load_properties(fp))
    except FileNotFoundError as exc:
        raise ConfigError("file not found", file=str(path)) from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot be read: {exc}", file=str(path)) from exc


def env_name(key: str) -> str:
    """The environment variable for a server.config key: targetServer -> CONNECTOR_TARGET_SERVER,
    connectKWArgs -> CONNECTOR_CONNECT_KW_ARGS."""
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z]|$)|[A-Z]?[a-z0-9]+|[A-Z]+", key)
    return ENV_PREFIX + "_".join(w.upper() for w in words)


ENV_FOR_KEY = {key: env_name(key) for key in ServerConfig.keys()}   # authToken -> CONNECTOR_AUTH_TOKEN


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


REQUIRED_KEYS = ("targetServer", "authToken", "sources")


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
    public = {k: str(v) for k, v in values.items() if k not in sandbox.SECRET_KEYS}
    config, problems = _parse(ServerConfig, values, {"public_properties": public})
    if config is not None:
        return config, []
    errors: list[ConfigError] = []
    for name, message in problems.items():
        origin = _origin(name.split(".")[0], from_env, file)
        if message == "is required" and name in REQUIRED_KEYS:
            message = f"is required (or set the environment variable {ENV_FOR_KEY[name]})"
        errors.append(ConfigError(message, key=name, file=origin))
    return None, errors


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

def _forbidden_names(value: Any) -> tuple[str, ...]:
    return tuple(text_list(value))


@dataclasses.dataclass(frozen=True)
class CodeGuardConfig:
    """codeGuard: names, attributes and modules user code may not use (checked on the AST)."""

    forbid: tuple[str, ...] = setting("forbid", _forbidden_names, ())

    @classmethod
    def parse(cls, value: Any) -> CodeGuardConfig:
        if not isinstance(value, dict):
            raise Invalid(f"must be an object such as {{\"forbid\": [\"os\"]}}, not {_shown(value)}")
        config, problems = _parse(cls, value)
        if config is None:
            raise Invalid("; ".join(f"{k} {v}" for k, v in problems.items()))
        return config


def _module_names(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise Invalid(f"must be a list of module names such as [\"numpy\", \"pandas\"], not {value!r}")
    names: list[str] = []
    for item in value:
        if not isinstance(item, str) or not _MODULE_NAME.match(item.strip()):
            raise Invalid(f"{item!r} is not a module name (such as \"pandas\" or \"mypackage.models\")")
        if item.strip() not in names:
            names.append(item.strip())
    return tuple(names)


def _flag(name: str) -> Callable[[Any], bool]:
    return functools.partial(boolean, name=name)


def _whole(ge: int | None = None, le: int | None = None) -> Callable[[Any], int]:
    return functools.partial(integer, ge=ge, le=le)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """pythonExecConfig.general of the source's configuration document. Built directly (SourceConfig())
    it is not checked: `parse` checks."""

    codeCacheSize: int = setting("codeCacheSize", _whole(1, 1_000_000), 128)
    returnRuntimeInformation: bool = setting("returnRuntimeInformation", _flag("returnRuntimeInformation"), False)
    # Where user code runs: "process" (a pool of worker processes, protected) or "inline" (the
    # connector's own loop, as upstream; not protected).
    executionMode: str = setting("executionMode", choice("process", "inline"), "process")
    workers: int | None = setting("workers", optional(_whole(1, 512)), None)       # the most at once; None: CPUs
    minWorkers: int = setting("minWorkers", _whole(0, 512), 1)                       # kept running even when idle
    # a worker beyond minWorkers idle this long ends
    workerIdleSeconds: float = setting("workerIdleSeconds", functools.partial(number, gt=0), 60.0)
    maxQueriesPerWorker: int = setting("maxQueriesPerWorker", _whole(0), 0)         # then replaced (±10 %); 0: never
    maxWorkerMemoryMB: int = setting("maxWorkerMemoryMB", _whole(0), 0)             # resident, after a query; 0: never
    # modules a template process (the zygote) imports once; workers are forked from it with them loaded
    preload: tuple[str, ...] = setting("preload", _module_names, ())
    queriesPerWorker: int = setting("queriesPerWorker", _whole(1, 10_000), 16)      # concurrent queries per worker
    executionTimeout: float = setting("executionTimeout", functools.partial(number, ge=0), 300.0)  # s; 0: no limit
    # address-space limit per worker; 0/None: none
    memoryLimitMB: int | None = setting("memoryLimitMB", optional(_whole(0)), None)
    # Queries waiting for a worker (process mode; README "Flow control"): queued by cost. maxQueuedBytes:
    # their frames' bytes plus ~1 KiB each; beyond it, "busy". maxQueuedQueries: an explicit count cap
    # (None: none; 0: no query waits).
    maxQueuedQueries: int | None = setting("maxQueuedQueries", optional(_whole(0)), None)
    maxQueuedBytes: int = setting("maxQueuedBytes", _whole(0), DEFAULT_MAX_QUEUED_BYTES)
    codeGuard: CodeGuardConfig | None = setting("codeGuard", optional(CodeGuardConfig.parse), None)
    # true: `code` with `script`, and `script` with another `name`, are 400s (ambiguouscode,
    # ambiguousname) instead of upstream's reading of them (run the code; run the script under its name)
    strictParameters: bool = setting("strictParameters", _flag("strictParameters"), False)
    # Which globals a plain query returns: "plain", upstream's rule (what plain JSON encodes; the rest is
    # left out), or "rich": numpy, pandas, datetimes... encoded too (see values.py and the README).
    resultValues: str = setting("resultValues", choice("plain", "rich"), "plain")
    # RLIMIT_NOFILE of each worker process; RLIMIT_NPROC of the worker user, applied only with
    # workerUser (README, "Threat model" says what each bounds)
    maxOpenFiles: int = setting("maxOpenFiles", _whole(16, 1_048_576), sandbox.DEFAULT_MAX_OPEN_FILES)
    maxProcessesPerWorker: int = setting("maxProcessesPerWorker", _whole(8, 4_194_304), sandbox.DEFAULT_MAX_PROCESSES)
    # true: processes user code starts run until their worker ends, not only until their query does
    # (process mode; docs/PROCESSES.md)
    keepChildProcesses: bool = setting("keepChildProcesses", _flag("keepChildProcesses"), False)

    @staticmethod
    def cross_check(values: Mapping[str, Any], failed: set[str]) -> dict[str, str]:
        most, least = values.get("workers"), values.get("minWorkers")
        if most is not None and least is not None and least > most:
            return {"minWorkers": f"must not exceed workers ({most}), the most that may run"}
        return {}

    @classmethod
    def keys(cls) -> list[str]:
        return list(_keys(cls))

    @classmethod
    def parse(cls, general: Mapping[str, Any]) -> tuple[SourceConfig | None, dict[str, str]]:
        """(configuration or None, {key: problem}); keys it does not know are ignored."""
        return _parse(cls, general)

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
                self.maxProcessesPerWorker, self.preload, self.keepChildProcesses)


def source_config_problems(document: Any) -> tuple[SourceConfig | None, list[str], list[str]]:
    """What `check` says of a configureExtension document: the configuration (None when it is bad), its
    errors (the connector would log them and use the defaults) and warnings (unknown keys, ignored)."""
    section = document.get("pythonExecConfig") if isinstance(document, dict) else None
    general = section.get("general") if isinstance(section, dict) else section
    if general is None:
        return SourceConfig(), [], []
    if not isinstance(general, dict):
        return None, [f"pythonExecConfig.general must be an object, not {type(general).__name__}"], []
    known = SourceConfig.keys()
    warnings = [f"unknown key pythonExecConfig.general.{key} ignored (known: {', '.join(sorted(known))})"
                for key in general if key not in known]
    config, problems = SourceConfig.parse(general)
    return config, [f"pythonExecConfig.general.{key}: {problem}" for key, problem in problems.items()], warnings


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

"""ServerConfig: what server.config and the CONNECTOR_* environment say, checked once at start with every
problem reported at once, each naming its key and where its value came from."""
from __future__ import annotations

import json
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError, ValidationInfo, field_validator

from .. import sandbox
from ..configfile import (
    ENV_PREFIX,
    REQUIRED_KEYS,
    TOKEN_ENV,
    blank,
    env_name,
    origin,
    read_config_sources,
)
from ..configfile import merge_environment as _merge
from ..errors import ConfigError
from ..eventloop import LOOP_ENV, OLD_LOOP_ENV
from .connect import ConnectOptions, unknown_option
from .fields import (
    MODEL_CONFIG,
    REQUIRED,
    Flag,
    blank_is_none,
    keys_of,
    placeholder,
    problems,
    setting,
    suggestion,
    unknown_keys,
)

_WSOCK_PATH = re.compile(r"^/api/v\d+/wsock/websocket/?$")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PENDING_BYTES = 16 * 1024 * 1024     # per source; README "Flow control" says why
DEFAULT_SHUTDOWN_GRACE = 30.0
DEFAULT_MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
DEFAULT_DOCUMENT_TIMEOUT = 60.0
# CONNECTOR_* variables that are not server.config keys
OTHER_VARIABLES = {LOOP_ENV: "asyncio: run on asyncio's own event loop even when uvloop is installed (the speed "
                             f"extra); the old name {OLD_LOOP_ENV} still works, with a deprecation warning."}


def _target_server(value: str) -> str:
    value = value.strip()
    if placeholder(value) or re.search(r"<[^<>]*>", value):     # https://<your server>
        raise ValueError(f"is a placeholder ({value!r}): put the address of your Vantiq server here, "
                         "such as https://dev.vantiq.com")
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL such as https://dev.vantiq.com, not {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError(f"has a malformed port: {value!r}") from None
    return value


def _auth_token(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"is empty (set authToken or the environment variable {TOKEN_ENV})")
    if placeholder(value):       # the example's "<your access token>", "changeme"...: never a real token
        raise ValueError("is a placeholder, not an access token: put an access token of the sources' "
                         f"namespace here, or in the environment variable {TOKEN_ENV}")
    return value


def _sources(value: Any) -> Any:
    if not isinstance(value, str | list | tuple):
        return value           # refused by the type, naming what it is
    names = [str(n).strip() for n in (value.split(",") if isinstance(value, str) else value) if str(n).strip()]
    if not names:
        raise ValueError("must name at least one source (comma-separated)")
    if len(set(names)) != len(names):
        raise ValueError("names a source twice")
    fake = [n for n in names if placeholder(n)]
    if fake:
        raise ValueError(f"{fake[0]!r} is a placeholder: name the PYTHONEXECUTION sources of your namespace")
    return tuple(names)


def _connect_kwargs(value: Any) -> Any:
    """JSON text, as a properties file holds it, or an object."""
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"must be a JSON object: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict | ConnectOptions):
        raise ValueError("must be a JSON object such as {\"disableSslVerification\": true}")
    return value


def _package_index(value: str) -> str:
    value = value.strip()
    if value.lower() == "none":
        return "none"
    if urlsplit(value).scheme.lower() not in ("http", "https", "file"):
        raise ValueError(f"must be an index URL (https://...) or none, not {value!r}")
    return value


def _find_links(value: Any) -> Any:
    """Comma-separated folders or URLs of wheels (or a list of them)."""
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list | tuple):
        return tuple(str(item).strip() for item in value if str(item).strip())
    return value


def default_environments_dir() -> Path:
    """The user's cache directory (XDG), or ./environments when there is no home."""
    base = os.environ.get("XDG_CACHE_HOME") or (os.path.expanduser("~/.cache") if os.environ.get("HOME") else "")
    return Path(base) / "pyexec-connector" / "environments" if base else Path("environments").absolute()


def _environments_dir(value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        return default_environments_dir()
    return Path(str(value).strip()).absolute()


Port = Annotated[int, Field(ge=0, le=65535)]
_NAME = "user name or uid"


class ServerConfig(BaseModel):
    """What server.config (and the environment) says; frozen after start-up. A key is one field:
    `setting(default, meaning, key="camelCaseKey", ...)`; its variable, reference line and example follow."""

    model_config = MODEL_CONFIG

    target_server: Annotated[str, AfterValidator(_target_server)] = setting(
        REQUIRED, "The Vantiq server to connect to, such as https://dev.vantiq.com.", key="targetServer",
        example="https://dev.vantiq.com", kind="URL")
    auth_token: Annotated[str, AfterValidator(_auth_token)] = setting(
        REQUIRED, "An access token of the namespace that holds the sources. Prefer the environment variable, to "
        "keep it out of files.", key="authToken", example="<your access token>", kind="text", secret=True)
    sources: Annotated[tuple[str, ...], BeforeValidator(_sources)] = setting(
        REQUIRED, "The PYTHONEXECUTION sources this connector serves, comma-separated.", key="sources",
        example="pythonSource", kind="names, comma-separated", shape="source names, comma-separated")
    send_pings: Flag = setting(False, "true: a websocket ping every 20 s keeps proxies from closing an idle "
                               "connection.", key="sendPings", example=True)
    fail_on_connection_error: Flag = setting(False, "true: exit (code 1) when a connection attempt fails, "
                                             "instead of retrying.", key="failOnConnectionError")
    tcp_probe_port: Port = setting(8000, "Port of the plain-TCP health probe (Kubernetes tcpSocket); 0: "
                                   "none.", key="tcpProbePort")
    connect_kwargs: Annotated[ConnectOptions, BeforeValidator(_connect_kwargs)] = setting(
        None, "Websocket options, as a JSON object: {\"caFile\": \"/path/ca.pem\"} trusts a private CA, "
        "{\"disableSslVerification\": true} turns TLS verification off (testing only); the keys of "
        "websockets' connect() (open_timeout, ping_interval, proxy...), on the connector's own websocket.",
        key="connectKWArgs", factory=ConnectOptions, example='{"open_timeout": 10}', kind="JSON object")
    reconnect_secret: str | None = setting(
        None, "A fixed reconnect secret lets a restarted connector take over a half-open session.",
        key="reconnectSecret", example="my-fixed-secret", kind="text", secret=True)
    max_message_bytes: int = setting(
        DEFAULT_MAX_MESSAGE_BYTES, "Largest message, each way, in bytes; a larger query gets a 400 and the "
        "link stays up.", key="maxMessageBytes", ge=1024)
    max_pending_bytes: int = setting(
        DEFAULT_MAX_PENDING_BYTES, "Bytes of replies waiting for the websocket, per source; beyond it, code "
        "sending replies waits (flow control).", key="maxPendingBytes", ge=65536)
    max_document_bytes: int = setting(
        DEFAULT_MAX_DOCUMENT_BYTES, "Largest script document downloaded, in bytes.", key="maxDocumentBytes",
        ge=1024)
    document_timeout: float = setting(DEFAULT_DOCUMENT_TIMEOUT, "Seconds allowed per script document "
                                      "request.", key="documentTimeout", gt=0)
    metrics_port: Annotated[int | None, BeforeValidator(blank_is_none)] = setting(
        None, "Port of HTTP /healthz, /readyz and /metrics (Prometheus); off when absent.", key="metricsPort",
        example=9090, ge=1, le=65535)
    shutdown_grace_seconds: float = setting(
        DEFAULT_SHUTDOWN_GRACE, "Seconds a stopping connector (SIGTERM, SIGINT) lets in-flight queries "
        "finish before answering them with an error.", key="shutdownGraceSeconds", ge=0)
    worker_user: Annotated[str | None, BeforeValidator(blank_is_none)] = setting(
        None, "The user (name or uid) worker processes run as, with no supplementary groups. Needs a "
        "connector started as root (see the threat model).", key="workerUser", example="pyexec-worker",
        kind=_NAME)
    worker_group: Annotated[str | None, BeforeValidator(blank_is_none)] = setting(
        None, "The group (name or gid) of worker processes; default: workerUser's primary group.",
        key="workerGroup", example="pyexec-worker", kind="group name or gid")
    # per-script environments (docs/ENVIRONMENTS.md)
    script_dependencies: Flag = setting(
        False, "true: a script with a PEP 723 block (# /// script, dependencies = [...]) runs in an environment "
        "of its own, installed once with uv; false: such a script is answered 400 naming this key.",
        key="scriptDependencies")
    package_index: Annotated[str | None, BeforeValidator(blank_is_none), AfterValidator(_package_index)] = setting(
        None, "The index per-script environments install from (a URL), or none for no index (packageFindLinks "
        "only); default: uv's default index.", key="packageIndex", example="none", kind="URL or none")
    package_find_links: Annotated[tuple[str, ...], BeforeValidator(_find_links)] = setting(
        (), "Folders or URLs of wheels per-script environments install from, comma-separated (a wheelhouse "
        "for air-gapped sites).", key="packageFindLinks", example="/opt/wheelhouse",
        kind="folders or URLs, comma-separated", shape="folders or URLs, comma-separated")
    package_source_builds: Flag = setting(
        False, "true: per-script environments may build packages from source (that runs the package's own "
        "code at install time); false: wheels only.", key="packageSourceBuilds")
    environments_dir: Annotated[Path, BeforeValidator(_environments_dir)] = setting(
        None, "Where per-script environments are kept; default: ~/.cache/pyexec-connector/environments "
        "(XDG_CACHE_HOME), or ./environments without a home.", key="environmentsDir",
        factory=default_environments_dir, example="/var/lib/pyexec/environments", kind="folder")
    environments_max_mb: int = setting(
        4096, "Past this size (MiB) the least recently used per-script environments not in use are removed.",
        key="environmentsMaxMB", ge=0)
    # Everything the file said, minus the token and the reconnect secret: what user code sees through
    # get_server_config().
    public_properties: dict[str, str] = Field(default_factory=dict, exclude=True)

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
            if "worker_user" in info.data and info.data["worker_user"] is None:   # (a bad one is reported)
                raise ValueError("is set without workerUser: set workerUser too, or remove workerGroup")
            sandbox.resolve_group(value)
        return value

    @classmethod
    def keys(cls) -> list[str]:
        """Every key server.config (or the environment) may set."""
        return keys_of(cls)

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


ENV_FOR_KEY = {key: env_name(key) for key in ServerConfig.keys()}   # authToken -> CONNECTOR_AUTH_TOKEN


def websocket_options(config: ServerConfig) -> dict[str, Any]:
    """connectKWArgs as the link's websocket options (link.socket_options), checked at load."""
    return config.connect_kwargs.websocket_options()


def merge_environment(properties: Mapping[str, str], env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's properties plus, for each key the file lacks (or leaves empty, or to a placeholder such as
    the example's `<your access token>`), the value of its CONNECTOR_<KEY> environment variable. Returns
    (values, {key: variable} for those taken from env)."""
    return _merge(properties, env, ServerConfig.keys(), _unset)


def _unset(value: Any) -> bool:
    # the example copied as it is, with the token in the environment (docker run -e CONNECTOR_AUTH_TOKEN=...)
    return blank(value) or (isinstance(value, str) and placeholder(value))


def config_problems(properties: Mapping[str, str], env: Mapping[str, str] | None = None,
                    *, file: str | None = None) -> tuple[ServerConfig | None, list[ConfigError]]:
    """Validate everything and collect every problem at once (a user fixes a file in one go, not one
    line per start), each naming its key and where the value came from (the file or the environment
    variable)."""
    env = os.environ if env is None else env
    values, from_env = merge_environment(properties, env)
    for required in REQUIRED_KEYS:
        if blank(values.get(required)):
            values.pop(required, None)      # reported as missing, with the variable that could supply it
    public = {k: str(v) for k, v in values.items() if k not in sandbox.SECRET_KEYS}
    try:
        return ServerConfig.model_validate({**values, "public_properties": public}), []
    except ValidationError as exc:
        found = problems(exc, ServerConfig, sandbox.SECRET_KEYS, unknown=unknown_option)
    errors: list[ConfigError] = []
    for key in _in_order(found):
        message = found[key]
        if message == "is required" and key in REQUIRED_KEYS:
            message = f"is required (or set the environment variable {ENV_FOR_KEY[key]})"
        errors.append(ConfigError(message, key=key, file=origin(key, from_env, file)))
    return None, errors


def _in_order(found: Mapping[str, str]) -> list[str]:
    """The keys in the model's order (a file is read top to bottom; the reference lists them so)."""
    order = {key: i for i, key in enumerate(ServerConfig.keys())}
    return sorted(found, key=lambda k: order.get(k.split(".")[0], len(order)))


def config_warnings(properties: Mapping[str, str], env: Mapping[str, str] | None = None,
                    *, file: str | None = None) -> list[str]:
    """What is not wrong but likely a mistake: keys server.config has that the connector does not know
    (user code still sees them through get_server_config()), and CONNECTOR_* variables that are no key's."""
    env = os.environ if env is None else env
    where = file or "server.config"
    lines = [f"{where}: {line}" for line in unknown_keys(properties, ServerConfig.keys())]
    known = set(ENV_FOR_KEY.values()) | set(OTHER_VARIABLES)
    for variable in env:
        if variable.startswith(ENV_PREFIX) and variable not in known:
            meant = suggestion(variable, known)
            lines.append(f"unknown environment variable {variable}: "
                         + (f"did you mean {meant}?" if meant else "not a setting of the connector; ignored"))
    return lines


def build_server_config(properties: Mapping[str, str], env: Mapping[str, str] | None = None,
                        *, file: str | None = None) -> ServerConfig:
    """Validate raw properties (plus CONNECTOR_* environment variables for keys the file lacks) into a
    ServerConfig. Raises the first ConfigError."""
    config, found = config_problems(properties, env, file=file)
    if found:
        raise found[0]
    assert config is not None
    return config


def load_server_config(path: str | os.PathLike | None = None,
                       env: Mapping[str, str] | None = None) -> ServerConfig:
    """Find, read and validate server.config (or the environment alone). Raises ConfigError naming the
    file (or environment variable) and key."""
    properties, file = read_config_sources(path, env)
    return build_server_config(properties, env, file=file)

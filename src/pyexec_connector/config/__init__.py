"""Start-up configuration (server.config + environment) and per-source configuration, parsed once into
frozen pydantic models:

- `fields`: how a key is declared (`setting`), how pydantic's errors become one plain line per key, typo
  suggestions and placeholders;
- `connect`: connectKWArgs, checked against what the link's websocket honours;
- `server`: ServerConfig and reading it, with every problem at once;
- `source`: SourceConfig (pythonExecConfig.general);
- `reference`: docs/CONFIGURATION.md and serverConfig/server.config.example, generated from the models.

The file itself (finding, reading, the environment variables) is `configfile`, which needs no pydantic.

Adding a key is one field, with its meaning:

    # server.config (ServerConfig, server.py): the attribute in snake_case, the key as users write it
    environments_dir: str | None = setting(None, "Where per-script environments are kept.",
                                           key="environmentsDir", example="/var/lib/pyexec/environments")
    # a source's configuration (SourceConfig, source.py): the attribute is the key
    keepChildProcesses: Flag = setting(False, "true: a query's child processes may outlive it.")

Bounds are pydantic's (`ge=`, `le=`, `gt=`), choices a `Literal[...]`, booleans `Flag` (true/yes/on/1...);
a check of its own is an `Annotated[..., AfterValidator(check)]` whose ValueError reads after the key ("must
name at least one source"). The environment variable (CONNECTOR_ENVIRONMENTS_DIR), the check of unknown
keys and the messages follow from the field; then `python -m pyexec_connector.config.reference --write`
regenerates docs/CONFIGURATION.md and serverConfig/server.config.example (tests/test_config_reference.py
fails until it is run). A key that needs a new worker pool when it changes goes into `SourceConfig.pool_shape`."""
from ..booleans import FALSE_WORDS, TRUE_WORDS, parse_bool
from ..configfile import (
    CONFIG_LOCATIONS,
    ENV_PREFIX,
    LOGGER_INI,
    REQUIRED_KEYS,
    TOKEN_ENV,
    env_name,
    find_config_file,
    read_config_sources,
    read_properties,
)
from .connect import ConnectOptions, connect_option_names
from .server import (
    DEFAULT_DOCUMENT_TIMEOUT,
    DEFAULT_MAX_DOCUMENT_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_SHUTDOWN_GRACE,
    ENV_FOR_KEY,
    ServerConfig,
    build_server_config,
    config_problems,
    config_warnings,
    load_server_config,
    merge_environment,
    websocket_options,
)
from .source import (
    DEFAULT_MAX_QUEUED_BYTES,
    CodeGuardConfig,
    SourceConfig,
    parse_source_config,
    source_config_problems,
)

__all__ = [
    "CONFIG_LOCATIONS", "DEFAULT_DOCUMENT_TIMEOUT", "DEFAULT_MAX_DOCUMENT_BYTES", "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_PENDING_BYTES", "DEFAULT_MAX_QUEUED_BYTES", "DEFAULT_SHUTDOWN_GRACE", "ENV_FOR_KEY", "ENV_PREFIX",
    "FALSE_WORDS", "LOGGER_INI", "REQUIRED_KEYS", "TOKEN_ENV", "TRUE_WORDS", "CodeGuardConfig", "ConnectOptions",
    "ServerConfig", "SourceConfig", "build_server_config", "config_problems", "config_warnings",
    "connect_option_names", "env_name", "find_config_file", "load_server_config", "merge_environment",
    "parse_bool", "parse_source_config", "read_config_sources", "read_properties", "source_config_problems",
    "websocket_options",
]

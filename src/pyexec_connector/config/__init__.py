"""Start-up configuration (server.config + environment) and per-source configuration, parsed once into
frozen pydantic models:

- `fields`: how a key is declared (`setting`), how pydantic's errors become one plain line per key, typo
  suggestions and placeholders;
- `connect`: connectKWArgs, checked against the installed websockets;
- `server`: ServerConfig and reading it, with every problem at once;
- `source`: SourceConfig (pythonExecConfig.general);
- `reference`: docs/CONFIGURATION.md and serverConfig/server.config.example, generated from the models.

The file itself (finding, reading, the environment variables) is `configfile`, which needs no pydantic."""
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

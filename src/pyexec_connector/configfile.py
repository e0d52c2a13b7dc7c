"""server.config as text: where it is found, how it is read, and which CONNECTOR_* variable stands in for
each key. No validation here (that is `config`, on pydantic): `healthcheck`, which Docker runs every few
seconds, reads its one key through this module alone."""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jprops

from .errors import ConfigError

CONFIG_LOCATIONS = (Path("serverConfig") / "server.config", Path("server.config"))
LOGGER_INI = Path("serverConfig") / "logger.ini"
ENV_PREFIX = "CONNECTOR_"
TOKEN_ENV = "CONNECTOR_AUTH_TOKEN"
REQUIRED_KEYS = ("targetServer", "authToken", "sources")


def env_name(key: str) -> str:
    """The environment variable for a server.config key: targetServer -> CONNECTOR_TARGET_SERVER,
    connectKWArgs -> CONNECTOR_CONNECT_KW_ARGS."""
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z]|$)|[A-Z]?[a-z0-9]+|[A-Z]+", key)
    return ENV_PREFIX + "_".join(w.upper() for w in words)


def blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


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


def read_config_sources(path: str | os.PathLike | None = None,
                        env: Mapping[str, str] | None = None) -> tuple[dict[str, str], str | None]:
    """The properties of server.config (found as `find_config_file` does) and the file's name. With no
    file, empty properties, as long as the environment supplies the required keys."""
    env = os.environ if env is None else env
    found = find_config_file(path)
    if found is None:
        missing = [env_name(k) for k in REQUIRED_KEYS if blank(env.get(env_name(k)))]
        if not missing:
            return {}, None
        raise ConfigError("no server.config found (looked in " + ", ".join(str(p) for p in CONFIG_LOCATIONS)
                          + ") and the environment does not supply it (missing: " + ", ".join(missing) + ")")
    return read_properties(found), str(found)


def merge_environment(properties: Mapping[str, str], env: Mapping[str, str], keys: Iterable[str],
                      unset: Callable[[Any], bool] = blank) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's properties plus, for each of `keys` the file lacks (or leaves `unset`: empty), the value
    of its CONNECTOR_<KEY> environment variable. Returns (values, {key: variable} for those taken from env)."""
    values: dict[str, Any] = dict(properties)
    from_env: dict[str, str] = {}
    for key in keys:
        variable = env_name(key)
        if unset(values.get(key)) and not blank(env.get(variable)):
            values[key] = env[variable]
            from_env[key] = variable
    return values, from_env


def origin(key: str, from_env: Mapping[str, str], file: str | None) -> str | None:
    """Where a key's value came from, as a problem names it: the variable, or the file."""
    top = key.split(".")[0]
    return f"environment variable {from_env[top]}" if top in from_env else file


def raw_value(key: str, path: str | os.PathLike | None = None,
              env: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """One key's text as the connector would take it (the file first, then its variable), unvalidated,
    and where it came from. Raises ConfigError when there is no configuration to read."""
    env = os.environ if env is None else env
    properties, file = read_config_sources(path, env)
    values, from_env = merge_environment(properties, env, [key])
    value = values.get(key)
    return (None if blank(value) else str(value).strip()), origin(key, from_env, file)

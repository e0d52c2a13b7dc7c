"""`pyexec-connector envs list|prepare FILE...|prune`: the environments of this configuration
(server.config and CONNECTOR_* variables: environmentsDir, packageIndex, ...), listed, built ahead of
time (an image can bake them in) or removed. Exit codes: 0 done, 1 a script's environment failed,
2 a configuration error."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from .. import sandbox
from ..config import ENV_FOR_KEY, REQUIRED_KEYS, build_server_config, read_properties
from ..errors import ConfigError, QueryError
from .gate import environment_for
from .installer import InstallerMissing
from .manager import EnvironmentManager, EnvironmentSettings

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
# the keys a connector needs and this command does not: stand-ins when neither file nor environment has them
_STAND_INS = {"targetServer": "http://localhost", "authToken": "-", "sources": "-"}


def load_settings(config_path: str | None, env: Mapping[str, str] | None = None) -> EnvironmentSettings:
    """The environment settings of a configuration; the keys only a running connector needs may be missing."""
    from ..config import find_config_file
    env = os.environ if env is None else env
    found = find_config_file(config_path)
    properties = dict(read_properties(found)) if found is not None else {}
    for key, value in _STAND_INS.items():
        if not str(properties.get(key) or "").strip() and not env.get(ENV_FOR_KEY[key], "").strip():
            properties[key] = value
    assert set(_STAND_INS) == set(REQUIRED_KEYS)
    config = build_server_config(properties, env, file=str(found) if found else None)
    return EnvironmentSettings.from_config(config)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        settings = load_settings(args.config)
        manager = EnvironmentManager(settings)
    except (ConfigError, InstallerMissing) as exc:
        print(f"pyexec-connector envs: configuration error: {exc}")
        return EXIT_CONFIG
    if args.envs_command == "list":
        return _list(manager)
    if args.envs_command == "prepare":
        return asyncio.run(_prepare(manager, args.files))
    return _prune(manager, args.max_mb)


def _list(manager: EnvironmentManager) -> int:
    entries = manager.store.entries()
    print(f"{len(entries)} environment(s) in {manager.store.envs}, "
          f"{sum(e.size for e in entries) / 2**20:.1f} MiB")
    for entry in entries:
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used))
        print(f"{entry.key}  {entry.size / 2**20:8.1f} MiB  last used {used}  {', '.join(entry.requirements)}")
    return EXIT_OK


async def _prepare(manager: EnvironmentManager, files: list[Path]) -> int:
    code = EXIT_OK
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print(f"{file}: cannot be read: {exc}")
            code = EXIT_FAILED
            continue
        installs = manager.figures.installs
        try:
            environment = await environment_for(text, manager)
        except QueryError as exc:
            print(f"{file}: {exc.message()}")
            code = EXIT_FAILED
            continue
        if environment is None:
            print(f"{file}: declares no dependencies: runs in the connector's own environment")
        elif manager.figures.installs > installs:
            print(f"{file}: installed {environment.key} in {environment.install_seconds:.2f} s "
                  f"({', '.join(environment.requirements)})")
        else:
            print(f"{file}: ready {environment.key} ({', '.join(environment.requirements)})")
    return code


def _prune(manager: EnvironmentManager, max_mb: int | None) -> int:
    store = manager.store
    if max_mb is not None:
        removed = store.evict(max_mb * 1024 * 1024)
    else:
        removed = [e for e in store.entries() if store.remove_if_unused(e.key)]
    kept = store.entries()
    for leftover in store.leftovers():
        _remove(leftover)
    if store.cache.is_dir():     # uv's own cache: what no environment links to any more (uv locks it itself)
        subprocess.run([manager.uv, "cache", "prune", "--cache-dir", str(store.cache), "--quiet"],
                       env=sandbox.worker_environment(None), stdin=subprocess.DEVNULL, timeout=300, check=False)
    print(f"removed {len(removed)} environment(s) ({sum(e.size for e in removed) / 2**20:.1f} MiB); "
          f"{len(kept)} kept ({sum(e.size for e in kept) / 2**20:.1f} MiB)")
    return EXIT_OK


def _remove(path: Path) -> None:
    import shutil
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

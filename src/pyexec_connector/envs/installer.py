"""One environment installed with uv: `uv venv` on the connector's interpreter, then `uv pip install` of
the script's requirements together with the connector's runtime wheels. The operator's settings choose
the index and the wheel folders; nothing in the script does. uv runs with no configuration file, in an
environment without the connector's secrets (a source build runs code of the package's)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from .. import sandbox
from .requirements import EnvironmentSpec

REQUIREMENTS_FILE = "pyexec-requirements.txt"
MAX_REASON = 2000          # characters of the installer's error kept for the reply
_OUTPUT_LIMIT = 1 << 20    # bytes of the installer's output read; the rest is dropped
_NOISE = re.compile(r"^(Using Python .*|Resolved \d+ .*|Prepared \d+ .*|Installed \d+ .*|Audited \d+ .*)$")


class InstallFailed(Exception):
    """The installer refused or failed: `reason` is what it said (for the caller's 400)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class InstallerMissing(Exception):
    """No uv binary: the `envs` extra is not installed."""


@dataclasses.dataclass(frozen=True)
class InstallSettings:
    """The operator's choices (server.config): index, wheel folders, whether sources may be built."""

    index: str | None = None                # None: uv's default; "none": no index at all
    find_links: tuple[str, ...] = ()
    source_builds: bool = False
    timeout: float = 600.0                  # seconds one install may take


def find_uv() -> str:
    """The uv binary the `uv` distribution ships, else one on PATH."""
    with contextlib.suppress(ImportError, FileNotFoundError):
        from uv import find_uv_bin
        return str(find_uv_bin())
    found = shutil.which("uv")
    if found is None:
        raise InstallerMissing("uv is not installed: install the connector with its 'envs' extra "
                               "(pip install 'pyexec-connector[envs]')")
    return found


def install_command(uv: str, python: Path, requirements: Path, settings: InstallSettings,
                    runtime_folder: Path) -> list[str]:
    command = [uv, "pip", "install", "--no-config", "--color", "never", "--python", str(python),
               "--requirements", str(requirements), "--find-links", str(runtime_folder)]
    if settings.index is not None:
        command += ["--no-index"] if settings.index == "none" else ["--index-url", settings.index]
    for link in settings.find_links:
        command += ["--find-links", link]
    if not settings.source_builds:
        command += ["--only-binary", ":all:"]
    return command


def _environment(cache: Path) -> dict[str, str]:
    env = sandbox.worker_environment(None)
    env.update({"UV_CACHE_DIR": str(cache), "UV_PYTHON_DOWNLOADS": "never", "NO_COLOR": "1",
                "UV_NO_PROGRESS": "1"})
    return env


async def _run(command: list[str], env: Mapping[str, str], deadline: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*command, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                start_new_session=True)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout_at(deadline):
            kept = bytearray()
            while chunk := await proc.stdout.read(65536):
                if len(kept) < _OUTPUT_LIMIT:       # the rest is read and dropped: the pipe must not fill
                    kept += chunk[:_OUTPUT_LIMIT - len(kept)]
            code = await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await proc.wait()
        raise
    return code, kept.decode(errors="replace")


def reason(output: str) -> str:
    """What the installer said, without its progress lines, bounded."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip() and not _NOISE.match(line.strip())]
    text = "\n".join(lines)
    return text if len(text) <= MAX_REASON else "..." + text[-MAX_REASON:]


async def install(spec: EnvironmentSpec, target: Path, runtime_wheels: Mapping[str, Path],
                  settings: InstallSettings, cache: Path, uv: str | None = None) -> float:
    """Make the environment at `target` (removed first if a previous attempt left it). Returns the seconds
    it took; raises InstallFailed with the installer's reason (and removes `target`)."""
    uv = uv or find_uv()
    started = time.monotonic()
    deadline = asyncio.get_running_loop().time() + settings.timeout
    shutil.rmtree(target, ignore_errors=True)
    env = _environment(cache)
    try:
        code, output = await _run([uv, "venv", "--no-config", "--color", "never", "--quiet", "--python",
                                   sys.executable, str(target)], env, deadline)
        if code != 0:
            raise InstallFailed(f"uv venv failed: {reason(output)}")
        requirements = target / REQUIREMENTS_FILE
        lines = list(spec.requirements) + [f"{name} @ {wheel.as_uri()}" for name, wheel in runtime_wheels.items()]
        requirements.write_text("\n".join(lines) + "\n")
        folder = next(iter(runtime_wheels.values())).parent
        code, output = await _run(install_command(uv, python_of(target), requirements, settings, folder),
                                  env, deadline)
        if code != 0:
            raise InstallFailed(reason(output))
    except TimeoutError:
        shutil.rmtree(target, ignore_errors=True)
        raise InstallFailed(f"the install did not finish within {settings.timeout:g} s") from None
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return time.monotonic() - started


def python_of(environment: Path) -> Path:
    return environment / "bin" / "python"


def installed_size(path: Path) -> int:
    """Bytes an environment takes on disk (blocks, each inode once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total

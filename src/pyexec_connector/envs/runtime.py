"""What the connector's worker needs in every environment: the connector's own distribution and its
runtime dependencies, at the versions installed beside the connector, as a wheelhouse the installer reads
with no index.

The wheels are made from the installed files themselves (each distribution's RECORD), once per set of
versions: the machine may have no index, and the exact bits the connector runs with are what its
workers in an environment run with. Installing them as ordinary wheels, rather than pointing a .pth at
the base environment, lets the resolver see them: a script that asks for another version of one of them
is a conflict the resolver reports, not a second copy that shadows the worker's (docs/ENVIRONMENTS.md)."""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import importlib.metadata as metadata
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .requirements import Pin

CONNECTOR = "pyexec-connector"
# installed beside the connector, used by its workers when present (the "speed" extra)
OPTIONAL = ("uvloop",)
# installer bookkeeping of the base environment: not part of a wheel
_SKIPPED_META = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})


class RuntimeMissing(Exception):
    """The connector's own distributions cannot be found or packed (a broken installation)."""


@dataclasses.dataclass(frozen=True)
class RuntimeSet:
    """The connector's distributions: {canonical name: Pin}, and a fingerprint of their versions."""

    pins: dict[str, Pin]

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(sorted((p.name, p.version) for p in self.pins.values()))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def runtime_set() -> RuntimeSet:
    """The connector and the closure of its runtime requirements (markers evaluated, no extras), plus
    OPTIONAL distributions that are installed."""
    try:
        root = metadata.distribution(CONNECTOR)
    except metadata.PackageNotFoundError:
        raise RuntimeMissing(f"the {CONNECTOR} distribution is not installed (run from an installed copy, "
                            "for example `pip install -e .`)") from None
    pins = {CONNECTOR: Pin(CONNECTOR, root.version, f"{CONNECTOR} {root.version}")}
    todo: list[tuple[str, str]] = [(CONNECTOR, r) for r in root.requires or ()]
    todo += [(CONNECTOR, name) for name in OPTIONAL if _installed(name)]
    while todo:
        parent, text = todo.pop()
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in pins:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise RuntimeMissing(f"{parent} requires {text}, which is not installed") from None
        pins[name] = Pin(name, dist.version, f"{parent} requires {text}")
        todo += [(name, r) for r in dist.requires or ()]
    return RuntimeSet(pins)


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def wheelhouse(runtime: RuntimeSet, parent: Path) -> dict[str, Path]:
    """{canonical name: wheel} of every runtime distribution, made under `parent` once per fingerprint
    (in a temporary folder renamed into place, so a half-made wheelhouse is never used)."""
    folder = parent / f"runtime-{runtime.fingerprint}"
    if not folder.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".runtime-", dir=parent))
        try:
            for pin in runtime.pins.values():
                pack(metadata.distribution(pin.name), scratch)
            with contextlib.suppress(OSError):      # another process made it meanwhile: theirs is as good
                os.rename(scratch, folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    wheels: dict[str, Path] = {}
    for wheel in folder.glob("*.whl"):
        wheels[canonicalize_name(wheel.name.split("-")[0])] = wheel
    missing = set(runtime.pins) - set(wheels)
    if missing:
        raise RuntimeMissing(f"the runtime wheelhouse {folder} lacks {', '.join(sorted(missing))}: remove it")
    return wheels


def pack(dist: metadata.Distribution, folder: Path) -> Path:
    """A wheel of an installed distribution, from the files its RECORD lists (scripts and byte code left
    out), with the tags its WHEEL file names. Stored, not compressed: it is read once, locally."""
    wheel_meta = dist.read_text("WHEEL")
    if wheel_meta is None or dist.files is None:
        raise RuntimeMissing(f"{dist.metadata['Name']} {dist.version} was not installed from a wheel (no WHEEL "
                            "or RECORD file): reinstall it with pip")
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    version = dist.version.replace("-", "_")
    info = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-{_compressed_tag(tags or ['py3-none-any'])}.whl"
    record: list[str] = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for file in dist.files:
            parts = file.parts
            if parts[0] == ".." or "__pycache__" in parts or file.suffix == ".pyc":
                continue
            if parts[0].endswith(".dist-info"):
                if len(parts) != 2 or parts[1] in _SKIPPED_META:
                    continue
                arcname = f"{info}/{parts[1]}"
            else:
                arcname = file.as_posix()
            source = Path(str(dist.locate_file(file)))
            if not source.is_file():
                continue
            data = source.read_bytes()
            archive.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{arcname},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def _compressed_tag(tags: list[str]) -> str:
    """The file name's tag part for a set of tags (py-abi-platform each, joined with '.' per part)."""
    columns: list[list[str]] = [[], [], []]
    for tag in tags:
        for column, part in zip(columns, tag.split("-"), strict=True):
            if part not in column:
                column.append(part)
    return "-".join(".".join(column) for column in columns)

"""Tiny wheels written at test time (a wheel is a zip with a dist-info folder): the environments' tests
install from a folder of them with no index, so no test needs the network."""
from __future__ import annotations

import base64
import hashlib
import zipfile
from collections.abc import Iterable
from pathlib import Path


def make_wheel(folder: Path, name: str, version: str, *, requires: Iterable[str] = (),
               code: str | None = None, extra: dict[str, str] | None = None) -> Path:
    """`name`-`version`, a pure-Python wheel of one module named `name` (by default VERSION = version),
    plus `extra` files (path in the wheel: text)."""
    folder.mkdir(parents=True, exist_ok=True)
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": code if code is not None else f"VERSION = {version!r}\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\n"
                            f"Name: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        **(extra or {}),
    }
    record = []
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for arcname, text in files.items():
            data = text.encode()
            archive.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{arcname},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def script(*dependencies: str, body: str = "", requires_python: str | None = None) -> str:
    """Python code with a PEP 723 block declaring `dependencies`."""
    lines = ["# /// script"]
    if requires_python is not None:
        lines.append(f"# requires-python = {requires_python!r}")
    lines.append("# dependencies = [" + ", ".join(f'"{d}"' for d in dependencies) + "]")
    lines.append("# ///")
    return "\n".join(lines) + "\n" + body

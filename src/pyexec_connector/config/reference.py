"""docs/CONFIGURATION.md and serverConfig/server.config.example, written from the models: a key's type,
default, variable and meaning are said once, in its field.

    python -m pyexec_connector.config.reference --write    # from the repository's root
    python -m pyexec_connector.config.reference --check    # exit 1 when the files and the code disagree
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ..configfile import CONFIG_LOCATIONS, env_name
from .connect import ConnectOptions
from .fields import keys_of
from .server import OTHER_VARIABLES, ServerConfig
from .source import CodeGuardConfig, SourceConfig

PAGE = Path("docs") / "CONFIGURATION.md"
EXAMPLE = Path("serverConfig") / "server.config.example"
MIB = 1024 * 1024
_GENERATED = "python -m pyexec_connector.config.reference --write"


def _fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    keys = set(keys_of(model))
    return [(info.alias or name, info) for name, info in model.model_fields.items() if (info.alias or name) in keys]


def _extra(info: FieldInfo) -> dict[str, Any]:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def _bounds(metadata: Iterable[Any]) -> str:
    low = high = ""
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = f"{item.ge:g}" if isinstance(item.ge, float) else f"{item.ge}"
        elif isinstance(item, annotated_types.Gt):
            low = f"> {item.gt:g}" if isinstance(item.gt, float) else f"> {item.gt}"
        elif isinstance(item, annotated_types.Le):
            high = f"{item.le}"
    if low and high:
        return f", {low}–{high}"
    if low:
        return f", {low if low.startswith('>') else '≥ ' + low}"
    return f", ≤ {high}" if high else ""


def type_text(info: FieldInfo) -> str:
    """The type as a user reads it: "whole number, 0–65535", "`process` or `inline`"."""
    kind = _extra(info).get("kind")
    if kind:
        return str(kind)
    members = [a for a in typing.get_args(info.annotation) if a is not type(None)] \
        if typing.get_origin(info.annotation) in (typing.Union, types.UnionType) else [info.annotation]
    base, metadata = members[0], list(info.metadata)
    if typing.get_origin(base) is typing.Annotated:      # Seconds = Annotated[float, Field(gt=0)]
        base, *more = typing.get_args(base)
        for item in more:
            metadata += item.metadata if isinstance(item, FieldInfo) else [item]
    if typing.get_origin(base) is Literal:
        return " or ".join(f"`{v}`" for v in typing.get_args(base))
    words: dict[Any, str] = {bool: "true or false", int: "whole number", float: "number", str: "text"}
    if base in words:
        return words[base] + ("" if base in (bool, str) else _bounds(metadata))
    if typing.get_origin(base) in (tuple, list):
        return "list"
    return getattr(base, "__name__", str(base))


def default_text(key: str, info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        return "{}"
    value = info.default
    if value is None or value is PydanticUndefined:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[]" if not value else ", ".join(value)
    if isinstance(value, int) and key.endswith("Bytes") and value % MIB == 0:
        return f"{value} ({value // MIB} MiB)"
    if isinstance(value, float):
        return f"{value:g}"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def render_page() -> str:
    """docs/CONFIGURATION.md."""
    server = [(f"`{k}`", type_text(i), default_text(k, i), f"`{env_name(k)}`", i.description or "")
              for k, i in _fields(ServerConfig)]
    connect = [(f"`{k}`", type_text(i), i.description or "") for k, i in _fields(ConnectOptions)]
    source = [(f"`{k}`", type_text(i), default_text(k, i), i.description or "") for k, i in _fields(SourceConfig)]
    guard = [(f"`{k}`", type_text(i), default_text(k, i), i.description or "") for k, i in _fields(CodeGuardConfig)]
    locations = " then ".join(f"`{p}`" for p in CONFIG_LOCATIONS)
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from src/pyexec_connector/config/ by `{_GENERATED}`; do not edit by hand: a test",
        "     fails when this page and the code disagree. -->",
        "",
        "The connector has two configurations: **server.config** (with the environment), read once at start,",
        "and each **source's configuration**, which the Vantiq server sends when the source connects.",
        "",
        "## server.config",
        "",
        f"Looked for in {locations} (or `--config PATH`); Java-properties syntax (`key = value`, `#`",
        "comments). Each key may instead come from its environment variable when the file lacks it or leaves",
        "it empty (the file wins); with the three required keys in the environment no file is needed.",
        "[`serverConfig/server.config.example`](../serverConfig/server.config.example) is this table as a",
        "commented file to copy.",
        "",
        *_table(("key", "type", "default", "environment variable", "meaning"), server),
        "",
        "### connectKWArgs",
        "",
        "A JSON object. Its typed keys:",
        "",
        *_table(("key", "type", "meaning"), connect),
        "",
        "They mean what they mean to websockets' `connect()`, on the connector's own websocket (websockets'",
        "sans-I/O protocol: every option works on every websockets release the package allows). Any other",
        "keyword asyncio's `create_connection()` takes is passed on as given; a key neither knows is refused",
        "at start, naming it. TLS is the connector's: `ssl`, `logger` and the like are refused.",
        "",
        "## Other environment variables",
        "",
        *_table(("variable", "meaning"), ((f"`{k}`", v) for k, v in OTHER_VARIABLES.items())),
        "",
        "## A source's configuration (`pythonExecConfig.general`)",
        "",
        "The source's configuration in Vantiq, such as",
        "`{\"pythonExecConfig\": {\"general\": {\"codeCacheSize\": 128, \"workers\": 4}}}`. A bad value is",
        "logged naming its key and the source runs on the defaults; `pyexec-connector check` reports it.",
        "",
        *_table(("key", "type", "default", "meaning"), source),
        "",
        "### codeGuard",
        "",
        *_table(("key", "type", "default", "meaning"), guard),
        "",
        "## What the connector points out",
        "",
        "- Every problem at once, each naming its key, the value and where it came from (the file or the",
        "  environment variable); `run` exits with code 2, `check` says the same before any connection.",
        "- A key it does not know, in server.config or in a source's configuration, is a warning naming the",
        "  closest known key: ``unknown key `sendPing`: did you mean `sendPings`?`` (user code still sees",
        "  server.config's other keys through `get_server_config()`).",
        "- A placeholder (`<your access token>`, `changeme`, `${TOKEN}`...) as `authToken`, `targetServer` or a",
        "  source name is a configuration error naming the key, unless the key's environment variable gives a",
        "  value: a placeholder in the file counts as not set (the example can be copied as it is, with",
        "  `CONNECTOR_AUTH_TOKEN` in the environment).",
        "",
    ]
    return "\n".join(lines)


def _property(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, 108, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)


def render_example() -> str:
    """serverConfig/server.config.example: the required keys set (to placeholders the connector refuses
    until they are replaced), every other key commented out at its default or an example."""
    lines = [
        "# server.config for pyexec-connector (Java-properties syntax): copy it to serverConfig/server.config",
        "# and set the first three keys. Each key may instead come from the environment variable named under",
        "# it, when this file lacks it, leaves it empty or keeps a placeholder such as <your access token> (a",
        "# value in the file wins). The reference: docs/CONFIGURATION.md.",
        f"# Generated with that page ({_GENERATED}).",
    ]
    for key, info in _fields(ServerConfig):
        extra = _extra(info)
        default = None if info.is_required() else default_text(key, info).replace("`", "")
        meaning = (info.description or "") + (f" Default: {default}." if default not in (None, "none") else "")
        lines += ["", *_comment(meaning), f"# Environment variable: {env_name(key)}"]
        value = extra.get("example", "" if info.default is None else info.default)
        # required keys set (to examples or placeholders), the others commented out
        lines.append(f"{'' if info.is_required() else '#'}{key} = {_property(value)}")
    lines += ["", "# Other environment variables:"]
    for variable, meaning in OTHER_VARIABLES.items():
        lines += _comment(f"{variable}: {meaning}")
    return "\n".join(lines) + "\n"


def outputs() -> dict[Path, str]:
    """{path from the repository's root: content} of every generated file."""
    return {PAGE: render_page(), EXAMPLE: render_example()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyexec_connector.config.reference",
                                     description="Write (or check) docs/CONFIGURATION.md and "
                                                 "serverConfig/server.config.example from the configuration models.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", action="store_true", help="write both files")
    what.add_argument("--check", action="store_true", help="exit 1 when a file differs from what the code says")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository's root (default: here)")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        target = args.root / path
        if args.write:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target}")
        elif not target.is_file() or target.read_text(encoding="utf-8") != text:
            stale.append(str(path))
    if stale:
        print(f"out of date with the code: {', '.join(stale)}; run {_GENERATED}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

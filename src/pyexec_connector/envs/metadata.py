"""The PEP 723 inline script metadata block: found and read, never executed. Pure: no I/O."""
from __future__ import annotations

import dataclasses
import re
import tomllib
from typing import Any

# The regular expression of the inline script metadata specification (packaging.python.org,
# "Inline script metadata"): a block starts with `# /// TYPE` and ends with `# ///`, every line between
# is `#` alone or `# ` followed by content.
_BLOCK = re.compile(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$")
_MARKER = "# /// script"


class MetadataError(ValueError):
    """A `script` block that is not valid: said to the caller as it is (a 400)."""


@dataclasses.dataclass(frozen=True)
class ScriptMetadata:
    """What a script's block declares: its requirements as written, and `requires-python` (None: any)."""

    dependencies: tuple[str, ...] = ()
    requires_python: str | None = None


def block_text(text: str) -> str | None:
    """The text of a script's one `script` block as found by plain searches (no parse): a cache key for
    what the block was found to mean. None when there is no marker, or more than one (the full reading
    then decides)."""
    start = text.find(_MARKER)
    if start < 0 or text.find(_MARKER, start + 1) >= 0:
        return None
    end = text.find("\n# ///", start + len(_MARKER))
    return text[start:end + 6] if end >= 0 else None


def read_block(text: str) -> ScriptMetadata | None:
    """The script's `script` block, or None when it has none. Raises MetadataError for two blocks, TOML
    that does not parse, or keys of the wrong type."""
    if _MARKER not in text:        # the common case costs one substring search
        return None
    blocks = [m for m in _BLOCK.finditer(text) if m.group("type") == "script"]
    if not blocks:
        return None
    if len(blocks) > 1:
        raise MetadataError("the script has more than one '# /// script' block")
    content = "".join(line[2:] if line.startswith("# ") else line[1:]
                      for line in blocks[0].group("content").splitlines(keepends=True))
    try:
        table = tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
        raise MetadataError(f"the '# /// script' block is not valid TOML: {exc}") from None
    return _metadata(table)


def _metadata(table: dict[str, Any]) -> ScriptMetadata:
    dependencies = table.get("dependencies", [])
    if not isinstance(dependencies, list) or not all(isinstance(d, str) for d in dependencies):
        raise MetadataError("'dependencies' in the '# /// script' block must be a list of strings")
    requires = table.get("requires-python")
    if requires is not None and not isinstance(requires, str):
        raise MetadataError("'requires-python' in the '# /// script' block must be a string")
    return ScriptMetadata(tuple(d.strip() for d in dependencies if d.strip()), requires)

"""The query path's side of per-script environments: a script's text in, its environment (or None: it
runs as today) out, and every refusal as the QueryError its caller answers with (a 400)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .. import errors
from ..errors import QueryError
from .installer import InstallFailed
from .metadata import MetadataError, ScriptMetadata, block_text, read_block
from .requirements import Conflict, PythonMismatch, check_python

if TYPE_CHECKING:          # uv is needed only with scriptDependencies on: the manager is not imported here
    from .manager import EnvironmentManager
    from .store import Environment

FEATURE_KEY = "scriptDependencies"


def script_metadata(text: str | None) -> ScriptMetadata | None:
    """The script's block, or None. Raises QueryError for a broken block, or a `requires-python` this
    interpreter does not meet (honoured whether or not scriptDependencies is on)."""
    if not text:
        return None
    try:
        metadata = read_block(text)
        if metadata is not None:
            check_python(metadata.requires_python)
    except PythonMismatch as exc:
        raise QueryError(errors.REQUIRES_PYTHON, "The script cannot run here: {0}.", [str(exc)]) from None
    except MetadataError as exc:
        raise QueryError(errors.BAD_SCRIPT_METADATA, "The script's metadata is not valid: {0}.", [str(exc)]) from None
    return metadata


async def environment_for(text: str | None, manager: EnvironmentManager | None) -> Environment | None:
    """The environment a script declares, installed if need be (the caller bounds the wait); None for a
    script without dependencies. `manager` None: scriptDependencies is off."""
    metadata = script_metadata(text)
    if metadata is None or not metadata.dependencies:
        return None
    if manager is None:
        raise QueryError(errors.DEPENDENCIES_OFF,
                         "The script declares dependencies ({0}) and this connector does not install them: an "
                         "operator turns that on with " + FEATURE_KEY + " = true (server.config, or the "
                         "environment variable CONNECTOR_SCRIPT_DEPENDENCIES).", [", ".join(metadata.dependencies)])
    try:
        spec = manager.plan(metadata)
    except Conflict as exc:
        raise QueryError(errors.DEPENDENCY_CONFLICT, "The script's dependencies conflict with the connector's: "
                                                     "{0}.", [str(exc)]) from None
    except MetadataError as exc:
        raise QueryError(errors.BAD_SCRIPT_METADATA, "The script's metadata is not valid: {0}.", [str(exc)]) from None
    try:
        environment = await manager.ensure(spec)
    except InstallFailed as exc:
        if "pyexec-connector" in exc.reason:       # the resolver met the connector's own requirements
            raise QueryError(errors.DEPENDENCY_CONFLICT, "The script's dependencies ({0}) conflict with the "
                             "connector's: {1}", [", ".join(spec.requirements), exc.reason]) from None
        raise QueryError(errors.INSTALL_FAILED, "Installing the script's dependencies ({0}) failed: {1}",
                         [", ".join(spec.requirements), exc.reason]) from None
    block = block_text(text or "")
    if block is not None:
        manager.remember(block, environment)
    return environment

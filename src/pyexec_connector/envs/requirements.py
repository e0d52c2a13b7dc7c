"""A script's requirement set, normalized into the key of its environment, and the checks that answer a
query before anything is installed: `requires-python`, and a direct clash with what the connector's own
worker needs. Pure: no I/O."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
from collections.abc import Iterable, Mapping

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name

from .metadata import MetadataError, ScriptMetadata


class RequirementError(ValueError):
    """The script cannot have an environment here; the message says why, naming what it asked for."""


class PythonMismatch(RequirementError):
    """`requires-python` excludes the connector's interpreter."""


class Conflict(RequirementError):
    """A requirement of the script excludes a version the connector's worker runs with."""


@dataclasses.dataclass(frozen=True)
class Pin:
    """A distribution the connector's worker needs in every environment: its installed version, and the
    requirement that brought it in (for the message that names both sides of a conflict)."""

    name: str          # canonical
    version: str
    wanted_by: str     # "pyexec-connector requires aiohttp<4,>=3.9"


@dataclasses.dataclass(frozen=True)
class EnvironmentSpec:
    """What one environment is: the normalized requirements, the interpreter, and the connector's own
    distributions (their fingerprint). Two scripts with equal specs share an environment."""

    requirements: tuple[str, ...]
    interpreter: str
    runtime: str                   # fingerprint of the connector's distributions (runtime.RuntimeSet)
    requires_python: str | None = None

    @property
    def key(self) -> str:
        """Content address: the same set of requirements on the same interpreter and connector."""
        blob = json.dumps([self.requirements, self.interpreter, self.runtime], separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def interpreter_id() -> str:
    """The interpreter environments are built on: implementation, exact version, ABI and machine."""
    return f"{sys.implementation.name}-{platform.python_version()}{sys.abiflags}-{platform.machine()}"


def normalize(dependencies: Iterable[str]) -> tuple[str, ...]:
    """Each requirement in one canonical spelling (name canonicalized, extras sorted, specifiers in a fixed
    order), duplicates dropped, sorted: `Requests >= 2` and `requests>=2` are one environment."""
    normalized: set[str] = set()
    for text in dependencies:
        try:
            requirement = Requirement(text)
        except InvalidRequirement as exc:
            raise MetadataError(f"{text!r} in 'dependencies' is not a valid requirement: {exc}") from None
        if requirement.url:
            raise MetadataError(f"{text!r} in 'dependencies' names where to get the package: the operator chooses "
                                "that (packageIndex, packageFindLinks), a script names only packages and versions")
        spelled: str = canonicalize_name(requirement.name)
        if requirement.extras:
            spelled += "[" + ",".join(sorted(canonicalize_name(e) for e in requirement.extras)) + "]"
        spelled += ",".join(sorted(str(s) for s in requirement.specifier))
        if requirement.marker is not None:
            spelled += f" ; {requirement.marker}"
        normalized.add(spelled)
    return tuple(sorted(normalized))


def check_python(requires_python: str | None, version: str | None = None) -> None:
    """Raises PythonMismatch when `requires-python` excludes this interpreter."""
    if requires_python is None:
        return
    version = version or platform.python_version()
    try:
        specifier = SpecifierSet(requires_python)
    except InvalidSpecifier:
        raise MetadataError(f"'requires-python' = {requires_python!r} is not a valid version specifier") from None
    if not specifier.contains(version, prereleases=True):
        raise PythonMismatch(f"the script requires Python {requires_python} (requires-python), and this "
                             f"connector runs Python {version}")


def check_conflicts(requirements: Iterable[str], pins: Mapping[str, Pin]) -> None:
    """Raises Conflict for the first requirement that excludes the installed version of a distribution the
    connector's worker needs. Only direct clashes are found here; the resolver finds the others."""
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            continue
        if not requirement.specifier.contains(pin.version, prereleases=True):
            raise Conflict(f"the script requires {text}, but the connector's worker needs {pin.wanted_by} and "
                           f"runs with {pin.name} {pin.version}")


def plan(metadata: ScriptMetadata, pins: Mapping[str, Pin], runtime: str,
         interpreter: str | None = None) -> EnvironmentSpec:
    """The environment a script's block asks for, once it passes every check made before installing.
    Raises MetadataError, PythonMismatch or Conflict."""
    check_python(metadata.requires_python)
    requirements = normalize(metadata.dependencies)
    check_conflicts(requirements, pins)
    return EnvironmentSpec(requirements, interpreter or interpreter_id(), runtime, metadata.requires_python)

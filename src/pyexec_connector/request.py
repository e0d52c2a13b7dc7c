"""The WITH clause of a query, parsed and validated into one QueryRequest or one QueryError. Pure."""
from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import errors
from .booleans import parse_bool
from .errors import QueryError, bad_parameter

KNOWN_PARAMETERS = frozenset({
    "code", "name", "script", "presetValues", "codeHandlesReturn", "limitReturnTo", "cache_code", "replace",
    "timeout", "captureOutput", "dryRun",
})


@dataclass(slots=True)
class QueryRequest:
    """Never changed once made (not frozen: one is made per query, see protocol.QueryFrame)."""
    code: str | None
    name: str | None
    script: str | None
    preset_values: dict[str, Any]
    code_handles_return: bool
    limit_return_to: tuple[str, ...] | None
    cache_code: bool
    replace: bool
    timeout: float | None = None      # seconds, from the WITH clause; None: the source's executionTimeout
    capture_output: bool = False      # reply with what the run printed (pythonOutput)
    dry_run: bool = False             # compile and guard only; nothing runs

    def __reduce__(self):
        # process mode pickles every request to a worker: a tuple of the fields is ~3x cheaper than
        # the getstate/setstate dataclasses generates for slots
        return (QueryRequest, _request_fields(self))

    @property
    def cache_key(self) -> str | None:
        """The name the compiled code is cached under: the script's, else the given name."""
        return self.script or self.name

    @property
    def filename(self) -> str:
        """`__file__` of the run: the name or script the caller gave (cache_key's, read without calling it:
        this is on every query)."""
        return self.script or self.name or "<query code>"



_request_fields = operator.attrgetter(*QueryRequest.__slots__)

def _boolean(params: dict[str, Any], key: str, default: bool) -> bool:
    value = params.get(key)
    if value is None:
        return default
    try:
        return parse_bool(value, name=key)
    except ValueError:
        raise bad_parameter(key, "a boolean (true/false)", value) from None


def _string(params: dict[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_parameter(key, "a string", value)
    return value


def _timeout(params: dict[str, Any]) -> float | None:
    value = params.get("timeout")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise bad_parameter("timeout", "a number of seconds", value) from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_parameter("timeout", "a number of seconds", value)
    if value < 0:
        raise QueryError(errors.BAD_PARAMETER, "The WITH parameter {0} must be {1}, not {2}.",
                         ["timeout", "0 (no limit) or a positive number of seconds", value])
    return float(value)


def _name(params: dict[str, Any], key: str) -> str | None:
    """A cache key, __file__ and (for script) a document name: empty text or a NUL cannot be any of them."""
    value = _string(params, key)
    if value is not None and (not value or "\x00" in value):
        raise QueryError(errors.BAD_PARAMETER, "The WITH parameter {0} must be a non-empty name without NUL "
                                               "characters, not {1}.", [key, repr(value)[:80]])
    return value


def _limit_return_to(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise QueryError(errors.BAD_RETURN_VALUES,
                     "The limitReturnTo parameter must be a list of strings or a comma-separated string, "
                     "not {0}.", [type(value).__name__])


_PLAIN_PARAMETERS = frozenset({"code", "name", "presetValues"})

# What parse_query tells its caller when it accepted a combination upstream accepts but the protocol
# calls ambiguous: (the messageCode strict mode would answer with, the script, the name or None).
LenientWarning = Callable[[str, str, str | None], None]


def parse_query(params: Any, *, strict: bool = False, warn: LenientWarning | None = None) -> QueryRequest:
    """Validate the query object. Raises QueryError (a 400 for the caller) naming what is wrong.

    `code` with `script`, and `script` with a different `name`, are accepted as upstream 1.3.4 accepts
    them (queries that work there must keep working): `code` runs and `script` is ignored; the document
    runs under the script's name. `warn` hears of each. `strict` (the source key strictParameters)
    makes both a 400 instead."""
    if type(params) is dict and params.keys() <= _PLAIN_PARAMETERS:
        # the common query (code and/or a name, presets) in a few checks; the same result as below
        code, name, presets = params.get("code"), params.get("name"), params.get("presetValues")
        if (type(code) is str or (code is None and name is not None)) \
                and (name is None or (type(name) is str and name and "\x00" not in name)) \
                and (presets is None or type(presets) is dict):
            return QueryRequest(code, name, None, {} if presets is None else presets, False, None,
                                name is not None, False)
    return parse_query_full(params, strict, warn)


def parse_query_full(params: Any, strict: bool = False, warn: LenientWarning | None = None) -> QueryRequest:
    """parse_query without the plain query's shortcut: every check, in order (what the shortcut must match)."""
    if not isinstance(params, dict):
        raise QueryError(errors.BAD_QUERY, "The query object must be a JSON object of WITH parameters, not {0}.",
                         [type(params).__name__ if params is not None else "null"])

    limit = _limit_return_to(params.get("limitReturnTo"))
    handles_return = _boolean(params, "codeHandlesReturn", False)
    if limit is not None and handles_return:
        raise QueryError(errors.CONFLICTING_RETURN,
                         "limitReturnTo cannot be used with codeHandlesReturn: the code sends its own replies.")

    presets = params.get("presetValues")
    if presets is None:
        presets = {}
    elif not isinstance(presets, dict):
        raise QueryError(errors.BAD_GLOBAL_PRESET,
                         "The presetValues parameter must be an object of global names to values, not {0}.",
                         [type(presets).__name__])

    capture_output = _boolean(params, "captureOutput", False)
    if capture_output and handles_return:
        raise QueryError(errors.CONFLICTING_RETURN,
                         "captureOutput cannot be used with codeHandlesReturn: the code sends its own replies.")

    code = _string(params, "code")
    name = _name(params, "name")
    script = _name(params, "script")
    if code is None and script is None and name is None:
        raise QueryError(errors.NO_CODE, "The query must provide code, a script document, or the name of "
                                         "cached code.")
    if code is not None and script is not None:
        if strict:
            raise QueryError(errors.AMBIGUOUS_CODE, "The query provides both code and script ({0}); provide "
                                                    "one (the source sets strictParameters).", [script])
        if warn is not None:
            warn(errors.AMBIGUOUS_CODE, script, name)
        script = None
    if script is not None and name is not None and name != script:
        if strict:
            raise QueryError(errors.AMBIGUOUS_NAME, "The script {0} and the name {1} differ; a script is cached "
                                                    "under its own name (the source sets strictParameters).",
                             [script, name])
        if warn is not None:
            warn(errors.AMBIGUOUS_NAME, script, name)
        name = script

    return QueryRequest(
        code=code,
        name=name,
        script=script,
        preset_values=presets,
        code_handles_return=handles_return,
        limit_return_to=limit,
        cache_code=_boolean(params, "cache_code", (name or script) is not None),
        replace=_boolean(params, "replace", False),
        timeout=_timeout(params),
        capture_output=capture_output,
        dry_run=_boolean(params, "dryRun", False),
    )

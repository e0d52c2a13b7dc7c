"""Every failure that reaches a Vantiq caller, and every messageCode, in one place."""
from __future__ import annotations

from typing import Any

_RUN = "io.vantiq.pyexecsource.runpython."

BAD_RETURN_VALUES = _RUN + "badreturnvaluesfor"
CONFLICTING_RETURN = _RUN + "conflictingreturn"
BAD_GLOBAL_PRESET = _RUN + "badglobalpreset"
NO_CODE = _RUN + "nocode"
AMBIGUOUS_CODE = _RUN + "ambiguouscode"
AMBIGUOUS_NAME = _RUN + "ambiguousname"
NO_CACHE = _RUN + "nocache"
BAD_QUERY = _RUN + "badquery"
BAD_PARAMETER = _RUN + "badparameter"
NO_REPLY = _RUN + "noreply"
TOO_LARGE = _RUN + "toolarge"
# a global named in limitReturnTo whose value no encoder can turn into JSON
UNENCODABLE_GLOBAL = _RUN + "unencodableglobal"
SHUTTING_DOWN = "io.vantiq.pyexecsource.shuttingdown"
SYNTAX_ERROR = "io.vantiq.pyexecsource.compile.syntaxerror"
EXECUTION_EXCEPTION = "io.vantiq.pyexecsource.execution.exception"
INTERNAL_ERROR = "io.vantiq.pyexecsource.internal.error"
DOC_INCOMPLETE = "io.vantiq.pyexecsource.docincomplete"
DOC_LENGTH = "io.vantiq.pyexecsource.doclength"
DOC_EMPTY = "io.vantiq.pyexecsource.doccontent.empty"
DOC_FETCH = "io.vantiq.pyexecsource.docfetch.failed"
# isolation and limits (execution engines)
TIMEOUT = "io.vantiq.pyexecsource.execution.timeout"
WORKER_DIED = "io.vantiq.pyexecsource.worker.died"
MEMORY_LIMIT = "io.vantiq.pyexecsource.execution.memorylimit"
BUSY = "io.vantiq.pyexecsource.busy"
GUARD_VIOLATION = "io.vantiq.pyexecsource.codeguard.violation"
# per-script environments (PEP 723 blocks; envs/)
_ENVS = "io.vantiq.pyexecsource.scriptdependencies."
DEPENDENCIES_OFF = _ENVS + "disabled"
BAD_SCRIPT_METADATA = _ENVS + "badmetadata"
REQUIRES_PYTHON = _ENVS + "requirespython"
DEPENDENCY_CONFLICT = _ENVS + "conflict"
INSTALL_FAILED = _ENVS + "installfailed"
DEPENDENCIES_INLINE = _ENVS + "inline"


class QueryError(Exception):
    """A failure reported to the VAIL caller as a 400 reply.

    User code may raise it too: ``raise QueryError("my.app.code", "bad value {0}", [x])``
    replies with exactly that messageCode, messageTemplate and parameters.
    """

    def __init__(self, code: str, template: str, params: list[Any] | tuple[Any, ...] | None = None):
        self.code = str(code)
        self.template = str(template)
        self.params = list(params) if params is not None else []
        super().__init__(self.message())

    def message(self) -> str:
        """The template with its parameters filled in, for logs."""
        text = self.template
        for i, value in enumerate(self.params):
            text = text.replace("{%d}" % i, str(value))
        return text

    def to_body(self) -> dict[str, Any]:
        return {"messageCode": self.code, "messageTemplate": self.template, "parameters": self.params}

    def __reduce__(self):  # survives pickling across the worker pipe
        return (QueryError, (self.code, self.template, self.params))


def bad_parameter(name: str, expected: str, value: Any) -> QueryError:
    return QueryError(BAD_PARAMETER, "The WITH parameter {0} must be {1}, not {2}.",
                      [name, expected, type(value).__name__])


class ConfigError(Exception):
    """A start-up configuration problem: reported as one line naming the file and key, exit code 2."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None):
        self.key = key
        self.file = file
        where = []
        if file:
            where.append(str(file))
        if key:
            where.append(f"key '{key}'")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class AuthenticationError(Exception):
    """The server refused the access token: retrying cannot help."""

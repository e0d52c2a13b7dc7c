"""What every configuration model shares: `setting()` declares a key (default, meaning, constraints) once,
for validation, the generated reference and the example file alike; `problems()` turns pydantic's errors
into one plain line per key; `unknown_keys()` names the key a typo meant."""
from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from ..booleans import parse_bool

REQUIRED: Any = ...      # the default of a key that has none


def setting(default: Any, description: str, *, key: str | None = None, example: Any = None,
            kind: str | None = None, shape: str | None = None, secret: bool = False,
            factory: Callable[..., Any] | None = None, **constraints: Any) -> Any:
    """A configuration key: its default (REQUIRED for none), what it means (the reference's words), and
    pydantic's constraints (ge=, le=...). `key`: the name users write, when the attribute's differs;
    `example`: a value for server.config.example when the default is no example; `kind`: the type as the
    reference shows it, when the annotation says it badly; `shape`: what a wrong type is told it must be
    ("a list of module names such as [...]"); `secret`: a value no message or repr may show; `factory`: makes
    the default (then `default` is not used)."""
    extra = {k: v for k, v in (("example", example), ("kind", kind), ("shape", shape), ("secret", secret)) if v}
    if factory is not None:
        constraints["default_factory"] = factory
    else:
        constraints["default"] = default
    return Field(alias=key, description=description, json_schema_extra=extra or None, repr=not secret,
                 **constraints)


# frozen: parsed once, read everywhere; unknown keys are warned of (`unknown_keys`), not refused
MODEL_CONFIG = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)


def _flag(value: Any) -> Any:
    try:
        return parse_bool(value, name="")
    except ValueError:
        raise ValueError(f"must be true or false, not {shown(value)}") from None


# booleans as properties files and Vantiq write them: true/yes/on/1, false/no/off/0 (any case)
Flag = Annotated[bool, BeforeValidator(_flag)]


def blank_is_none(value: Any) -> Any:
    """An empty value in a properties file means "not set"."""
    return None if isinstance(value, str) and not value.strip() else value


def shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- errors ---------------------------------------------------------------------------------------

_PLAIN = {
    "missing": "is required",
    "int_parsing": "must be a whole number", "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number", "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false",
    "string_type": "must be text", "list_type": "must be a list", "tuple_type": "must be a list",
    "dict_type": "must be an object", "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "greater_than_equal": "must be at least {ge}", "greater_than": "must be greater than {gt}",
    "less_than_equal": "must be at most {le}", "less_than": "must be less than {lt}",
    "literal_error": "must be {expected}",
}
_CONSTRAINTS = frozenset({"greater_than_equal", "greater_than", "less_than_equal", "less_than", "finite_number",
                          "literal_error", "value_error", "assertion_error", "path_not_file", "extra_forbidden"})


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plain(error: Mapping[str, Any], secret: bool) -> str:
    """One pydantic error as the rest of a line after the key: "must be at least 1, not 0"."""
    kind = error["type"]
    if kind in ("value_error", "assertion_error"):       # ours: written to read after the key
        return str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "path_not_file":
        return f"names no file: {shown(error.get('input'))}"
    ctx = {k: _number(v) for k, v in (error.get("ctx") or {}).items()}
    template = _PLAIN.get(kind)
    text = template.format(**ctx) if template else str(error["msg"])[:1].lower() + str(error["msg"])[1:]
    if kind == "missing" or secret:
        return text
    return f"{text}, not {shown(error.get('input'))}"


def _members(annotation: Any) -> list[Any]:
    """A union's members other than None (one for `X | None`)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _field_at(model: type[BaseModel], part: Any) -> FieldInfo | None:
    for name, info in model.model_fields.items():
        choices = getattr(info.validation_alias, "choices", None) or [info.validation_alias]
        if part in (name, info.alias, *choices):
            return info
    return None


def _locate(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, FieldInfo | None, tuple[Any, ...]]:
    """(dotted key, its field, the rest of loc) for an error's location: nested models' keys join the
    key ("connectKWArgs.open_timeout"); a union's branch names are dropped from the rest."""
    keys: list[str] = []
    info: FieldInfo | None = None
    rest = list(loc)
    current: type[BaseModel] | None = model
    while rest and current is not None:
        info = _field_at(current, rest[0])
        if info is None:
            break
        keys.append(str(rest.pop(0)))        # as the user wrote it (extra_headers, not additional_headers)
        members = _members(info.annotation)
        if len(members) > 1 and rest:
            rest.pop(0)          # which member of the union pydantic tried
        nested = members[0] if len(members) == 1 else None
        current = nested if isinstance(nested, type) and issubclass(nested, BaseModel) else None
    return ".".join(keys) or "?", info, tuple(rest)


def _extra(info: FieldInfo | None) -> dict[str, Any]:
    extra = info.json_schema_extra if info is not None else None
    return extra if isinstance(extra, dict) else {}


def problems(exc: ValidationError, model: type[BaseModel], secret_keys: Iterable[str] = (),
             unknown: Callable[[str], str] | None = None) -> dict[str, str]:
    """{key: problem} from a ValidationError of `model`, one line per key. Of a union's several errors the
    one about a limit or our own check wins; with only type errors, the field's `shape` says what fits.
    `unknown(key)`: the problem of a key a model with extra="forbid" does not have."""
    by_key: dict[str, list[tuple[Mapping[str, Any], FieldInfo | None, tuple[Any, ...]]]] = {}
    for details in exc.errors():
        error: Mapping[str, Any] = details
        key, info, rest = _locate(model, tuple(error["loc"]))
        if error["type"] == "extra_forbidden" and len(rest) == 1:
            key, rest = f"{key}.{rest[0]}", ()
            error = {**error, "type": "value_error",
                     "msg": unknown(str(error["loc"][-1])) if unknown else "is not a known key"}
        by_key.setdefault(key, []).append((error, info, rest))
    secrets = set(secret_keys)
    found: dict[str, str] = {}
    for key, errors in by_key.items():
        error, info, rest = next((e for e in errors if e[0]["type"] in _CONSTRAINTS), errors[0])
        extra = _extra(info)
        secret = key in secrets or bool(extra.get("secret"))
        if error["type"] not in _CONSTRAINTS and extra.get("shape") and not rest:
            found[key] = f"must be {extra['shape']}" + ("" if secret else f", not {shown(error.get('input'))}")
            continue
        message = _plain(error, secret)
        if rest:       # inside the key's value: an item of a list, a value of an object
            where = "".join(f"[{part}]" if isinstance(part, int) else f"[{part!r}]" for part in rest)
            message = f"{where} {message}"
        found[key] = message
    return found


# ---- unknown keys and placeholders ----------------------------------------------------------------

def keys_of(model: type[BaseModel]) -> list[str]:
    """The keys users write for `model`, in the order of its fields (fields excluded from the model's
    output, such as ServerConfig.public_properties, are the connector's own, not configuration)."""
    return [info.alias or name for name, info in model.model_fields.items() if not info.exclude]


def suggestion(word: str, known: Iterable[str]) -> str | None:
    """The known key a typo most likely meant ("sendPing" -> "sendPings"), or None."""
    import difflib  # only when a key is unknown

    known = list(known)
    by_folded = {k.lower(): k for k in known}
    if word.lower() in by_folded:
        return by_folded[word.lower()]
    close = difflib.get_close_matches(word.lower(), list(by_folded), n=1, cutoff=0.75)
    return by_folded[close[0]] if close else None


def unknown_keys(values: Mapping[str, Any], known: Iterable[str], prefix: str = "") -> list[str]:
    """One warning per key `known` lacks, naming the closest known key when there is one."""
    known = list(known)
    lines = []
    for key in values:
        if key in known:
            continue
        meant = suggestion(str(key), known)
        hint = f"did you mean `{meant}`?" if meant else "not a key of the connector; ignored"
        lines.append(f"unknown key `{prefix}{key}`: {hint}")
    return lines


_ANGLED = re.compile(r"^\s*<[^<>]*>\s*$")                      # <your access token>
_UNEXPANDED = re.compile(r"^\s*\$\{?[A-Za-z_]\w*\}?\s*$")      # ${VANTIQ_TOKEN}, left to a shell that never ran
_FILLER = re.compile(r"^\s*([xX*.#?_-])\1{2,}\s*$")            # xxxxx, ****, ... (not a test's one-letter token)
_PLACEHOLDER_WORDS = frozenset({
    "changeme", "changeit", "replaceme", "replacethis", "placeholder", "todo", "tbd", "fixme", "none", "null",
    "token", "accesstoken", "authtoken", "yourtoken", "youraccesstoken", "yourauthtoken", "yourtokenhere",
    "youraccesstokenhere", "tokenhere", "inserttokenhere", "puttokenhere", "secret", "yoursecret",
    "vantiqtoken", "yourvantiqtoken", "yourvantiqaccesstoken"})


def placeholder(value: str) -> bool:
    """True for a value that is plainly an example's stand-in, not a real one."""
    if _ANGLED.match(value) or _UNEXPANDED.match(value) or _FILLER.match(value):
        return True
    if not re.fullmatch(r"[A-Za-z _.\-]{2,40}", value.strip()):
        return False       # a real token is base64-ish: digits, mixed case, no spaces
    return re.sub(r"[^a-z]", "", value.lower()) in _PLACEHOLDER_WORDS

"""How Python values become JSON for Vantiq: the one encoder for results, streamed replies, error
parameters and notifications, in both engines.

Two rules:
- *rich* (`dumps`, `encode_rich`): numpy, pandas, datetimes, Decimal, UUID, sets, bytes, Enum,
  dataclasses and pydantic models become JSON data (the README's table); NaN and ±Infinity become null.
- *plain* (`encode_plain`): only what upstream's `json.dumps` takes (dict, list, tuple, str, int, float,
  bool, None), for the globals of a default query, where anything else is left out as upstream does.

orjson does the work (about 12x the standard library on a thousand rows). What it rejects (integers
beyond 64 bits, lone surrogates, nesting deeper than 254) falls back to a walk in Python and the standard
library's encoder, which take them as they always did.

numpy and pandas are never imported here: a value can only be one of their types if the user's code
imported them, so their classes are looked up in sys.modules."""
from __future__ import annotations

import base64
import gc
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import orjson

from .errors import UNENCODABLE_GLOBAL, QueryError

# Not OPT_SERIALIZE_NUMPY: orjson writes NaT in a datetime64 array as 1677-09-21, and gives the converters
# no say; tolist() is C-fast and gives Python values the converters and orjson then take.
_RICH = 0
_RICH_KEYS = orjson.OPT_NON_STR_KEYS     # twice the cost on every dict: only when plain keys failed
_PLAIN = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_ENCODE_ERRORS = (TypeError, ValueError, OverflowError, RecursionError)
_stdlib = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_dumps = orjson.dumps
# a str as a JSON string (C, quicker than any encoder's call for one short string; keeps lone surrogates)
encode_str: Callable[[str], str] = json.encoder.encode_basestring   # type: ignore[attr-defined]


class Unencodable(TypeError):
    """A value neither encoder can turn into JSON."""


class _Refused(TypeError):
    """A type no converter takes: raised inside orjson (its error's __cause__), so that what the walk
    would refuse as well is not tried again the slow way."""


# ---- public ------------------------------------------------------------------------------------

def dumps(value: Any) -> str:
    """Rich JSON text of any value the connector sends. Raises Unencodable.

    The cyclic GC is paused meanwhile: what the converters make (a DataFrame's thousand row dicts and
    its column lists) is freed by orjson before this returns and holds no cycles, yet its allocations
    would trigger a collection that scans it all (~35 µs a 1,000-row frame) and promote the user's
    frame to older generations, bringing on full collections (docs/PERFORMANCE.md, (l))."""
    if not gc.isenabled():
        return _dumps_rich(value)
    gc.disable()
    try:
        return _dumps_rich(value)
    finally:
        gc.enable()


def _dumps_rich(value: Any) -> str:
    try:
        return _dumps(value, default=_rich_default, option=_RICH).decode()
    except _ENCODE_ERRORS as exc:
        failure: BaseException = exc
    if str(failure) == "Dict key must be str":
        try:
            return _dumps(value, default=_rich_default, option=_RICH_KEYS).decode()
        except _ENCODE_ERRORS as exc:
            failure = exc
    return _slow(value, True, failure)


encode_rich = dumps


def encode_plain(value: Any) -> str:
    """JSON text of a value upstream's json.dumps would take (NaN as null). Raises Unencodable."""
    try:
        return _dumps(value, default=_plain_default, option=_PLAIN).decode()
    except _ENCODE_ERRORS as exc:
        return _slow(value, False, exc)


def to_data(value: Any) -> Any:
    """The value as plain JSON data (dicts, lists, str, numbers...), e.g. to cross a process boundary
    that accepts only plain data. Raises Unencodable."""
    return json.loads(dumps(value))


def type_name(value: Any) -> str:
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def globals_json(candidates: dict[str, Any], rich: bool, named: frozenset[str] | tuple[str, ...] = (),
                 skipped: list[dict[str, str]] | None = None) -> str:
    """The pythonCallResults object as JSON text. A value neither encoder takes is left out (and noted in
    `skipped`), unless its name is in `named`: then the query fails, naming it. Each value is encoded once:
    all together when they are plain JSON types at the top (the common case: one call), else one by one
    (a DataFrame next to a value that cannot be encoded is not encoded twice)."""
    if _JSON_TYPES.issuperset(map(type, candidates.values())):
        try:
            return _dumps(candidates, default=_rich_default if rich else _plain_default,
                          option=_RICH if rich else _PLAIN).decode()
        except _ENCODE_ERRORS:
            pass       # nested: an integer beyond 64 bits, a lone surrogate... value by value
    encode = encode_rich if rich else encode_plain
    parts = []
    for key, value in candidates.items():
        try:
            if not rich and type(value) not in _JSON_TYPES and _unplain_top(value):
                raise Unencodable(f"Type is not JSON serializable: {type_name(value)}")
            text = encode(value)
        except Unencodable as exc:
            if key in named:
                raise QueryError(UNENCODABLE_GLOBAL, "The global {0} named in limitReturnTo is a {1}, which "
                                                     "cannot be returned as JSON: {2}",
                                 [key, type_name(value), str(exc)]) from None
            if skipped is not None:
                skipped.append({"name": key, "type": type_name(value)})
            continue
        parts.append(f"{encode_str(key)}:{text}")
    return "{" + ",".join(parts) + "}"


# ---- plain ------------------------------------------------------------------------------------

def _plain_default(value: Any) -> Any:
    if isinstance(value, float):      # numpy.float64 and other float subclasses: json.dumps takes them
        return float(value)
    raise _Refused(f"Type is not JSON serializable: {type_name(value)}")


def _unplain_top(value: Any) -> bool:
    """orjson encodes Enum and UUID whatever its options; json.dumps does not (but IntEnum, StrEnum: yes).
    Checked for the globals themselves, where it decides what upstream would have left out."""
    module = type(value).__module__
    if module == "uuid":
        return True
    enum = sys.modules.get("enum")
    return enum is not None and isinstance(value, enum.Enum) and not isinstance(value, int | str)


_JSON_TYPES = JSON_TYPES = frozenset({dict, list, str, int, float, bool, type(None), tuple})


# ---- rich ------------------------------------------------------------------------------------

_converters: dict[type, Callable[[Any], Any]] = {}
_MAX_CONVERTERS = 512     # user code defining classes on every run must not grow it forever


def _rich_default(value: Any) -> Any:
    """orjson's `default`: one step towards JSON (orjson encodes what it returns, calling this again)."""
    kind = type(value)
    convert = _converters.get(kind)
    if convert is None:
        convert = _converter_for(kind)
        if len(_converters) >= _MAX_CONVERTERS:
            _converters.clear()
        _converters[kind] = convert
    return convert(value)


def _converter_for(kind: type) -> Callable[[Any], Any]:
    if issubclass(kind, float):
        return float
    if issubclass(kind, set | frozenset | type({}.keys()) | type({}.values()) | type({}.items())):
        return list
    if issubclass(kind, bytes | bytearray | memoryview):
        return _base64
    module = kind.__module__.partition(".")[0]
    if module == "pandas":
        converter = _pandas_converter(kind)
        if converter is not None:
            return converter
    if module == "numpy":
        np = sys.modules.get("numpy")
        if np is not None and issubclass(kind, np.ndarray):
            return _ndarray
        if np is not None and issubclass(kind, np.generic):
            return _np_scalar
    decimal = sys.modules.get("decimal")
    if decimal is not None and issubclass(kind, decimal.Decimal):
        return _decimal_fragment
    datetime = sys.modules.get("datetime")
    if datetime is not None and issubclass(kind, datetime.date | datetime.time):
        return _isoformat           # subclasses (orjson takes only the exact classes) and, in the walk, all
    if datetime is not None and issubclass(kind, datetime.timedelta):
        return _unencodable
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and issubclass(kind, pydantic.BaseModel):
        return _model_dump
    # what orjson encodes natively: needed by the walk
    enum = sys.modules.get("enum")
    if enum is not None and issubclass(kind, enum.Enum):
        return _enum_value
    if kind.__module__ == "uuid" and kind.__name__ == "UUID":
        return str
    dataclasses = sys.modules.get("dataclasses")
    if dataclasses is not None and dataclasses.is_dataclass(kind):
        return _dataclass_fields
    return _unencodable


def _unencodable(value: Any) -> Any:
    raise _Refused(f"Type is not JSON serializable: {type_name(value)}")


def _base64(value: Any) -> str:
    return base64.b64encode(value).decode("ascii")


def _isoformat(value: Any) -> Any:
    return value.isoformat()


def _enum_value(value: Any) -> Any:
    return value.value


def _model_dump(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    return dump() if dump is not None else value.dict()      # pydantic 2, or 1


def _dataclass_fields(value: Any) -> dict[str, Any]:
    return {name: getattr(value, name) for name in value.__dataclass_fields__}


def _decimal_fragment(value: Any) -> Any:
    """The exact digits (Decimal("1.10") arrives as 1.10), not a float's approximation."""
    if not value.is_finite():
        return None
    return orjson.Fragment(str(value).replace("E", "e"))


def _ndarray(value: Any) -> Any:
    if value.dtype.kind == "M":         # tolist() gives nanoseconds as integers; microseconds give datetimes
        value = value.astype("datetime64[us]")
    return value.tolist()


def _np_scalar(value: Any) -> Any:
    if value.dtype.kind == "M":
        value = value.astype("datetime64[us]")
    return value.item()


def _pandas_converter(kind: type) -> Callable[[Any], Any] | None:
    pd = sys.modules.get("pandas")
    if pd is None:
        return None
    if issubclass(kind, pd.DataFrame):
        return _frame_rows
    if issubclass(kind, pd.Series):
        return _series
    if kind is type(pd.NaT) or kind is type(pd.NA):
        return _none
    if issubclass(kind, pd.Timestamp):
        return _isoformat
    if issubclass(kind, pd.Index) or hasattr(kind, "tolist"):   # Index, Categorical, extension arrays
        return _tolist
    return None


def _none(value: Any) -> None:
    return None


def _tolist(value: Any) -> Any:
    return value.tolist()


def _is_default_index(index: Any) -> bool:
    """A RangeIndex 0, 1, 2... with no name: pandas' own numbering, nothing the caller wants to see."""
    return type(index).__name__ == "RangeIndex" and index.start == 0 and index.step == 1 and index.name is None


def _frame_rows(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame as VAIL rows: one object per row, its columns as properties; a named index becomes
    properties too. Column by column (tolist() gives Python values fast), then made into rows: about
    twelve times quicker than to_dict("records")."""
    if any(name is not None for name in frame.index.names):
        frame = frame.reset_index(allow_duplicates=True)
    names = [_key_text(name) for name in frame.columns]
    columns = _column_lists(frame)
    if not columns:
        return [{} for _ in range(len(frame))]
    if len(names) > _MAX_MADE_ROW:
        return [dict(zip(names, row, strict=False)) for row in zip(*columns, strict=False)]
    return _rows_maker(tuple(names))(*columns)


def _column_lists(frame: Any) -> list[list[Any]]:
    """Each column's values, in order. Series.tolist() is its array's tolist(); pandas' own
    _get_column_array gives that array without making a Series per column, which frame.items() does
    (~10 µs each on a frame not yet read: a third of the conversion, docs/PERFORMANCE.md). items() where
    a pandas lacks it."""
    column_array = getattr(frame, "_get_column_array", None)
    if column_array is None:
        return [column.tolist() for _, column in frame.items()]
    return [column_array(i).tolist() for i in range(len(frame.columns))]


_rows_makers: dict[tuple[str, ...], Callable[..., list[dict[str, Any]]]] = {}
_MAX_MADE_ROW = 64


def _rows_maker(names: tuple[str, ...]) -> Callable[..., list[dict[str, Any]]]:
    """A function making the rows from the columns: a list comprehension whose dict display has the
    column names as constant keys (one BUILD_CONST_KEY_MAP a row): about four times dict(zip(names,
    values)). The names enter its source only as repr() of str, which is always a string literal."""
    maker = _rows_makers.get(names)
    if maker is None:
        columns = ",".join(f"c{i}" for i in range(len(names)))
        values = ",".join(f"a{i}" for i in range(len(names)))
        display = ",".join(f"{name!r}:a{i}" for i, name in enumerate(names))
        maker = eval(f"lambda {columns}: [{{{display}}} for {values}, in zip({columns})]", {})  # noqa: S307
        if len(_rows_makers) >= _MAX_CONVERTERS:
            _rows_makers.clear()
        _rows_makers[names] = maker
    return maker


def _series(series: Any) -> Any:
    """A list for pandas' own numbering (0, 1, 2...), else an object keyed by the index."""
    values = series.tolist()
    index = series.index
    if _is_default_index(index):
        return values
    return dict(zip(map(_key_text, index.tolist()), values, strict=False))


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return key
    iso = getattr(key, "isoformat", None)
    if iso is not None:
        return iso()
    if isinstance(key, tuple):       # a MultiIndex column
        return ".".join(map(_key_text, key))
    return str(key)


# ---- the slow way: what orjson rejects ----------------------------------------------------------

def _slow(value: Any, rich: bool, failure: BaseException) -> str:
    if isinstance(failure.__cause__, _Refused):
        raise Unencodable(str(failure.__cause__)) from None
    try:
        return _stdlib(_walk(value, rich))
    except Exception as exc:    # noqa: BLE001 - a converter (pandas, pydantic...) may raise anything
        raise Unencodable(str(exc) or type(exc).__name__) from None


def _walk(value: Any, rich: bool) -> Any:
    """The value as data json.dumps takes: the same result as orjson's path, by the standard library.
    Recursion (deep nesting, cycles) ends in RecursionError, as json.dumps's own does."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {(k if type(k) is str else _walk_key(k, rich)): _walk(v, rich) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_walk(v, rich) for v in value]
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):          # bool and IntEnum included, as json.dumps writes them
        return value if isinstance(value, bool) else int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if not rich:
        raise TypeError(f"Type is not JSON serializable: {type_name(value)}")
    decimal = sys.modules.get("decimal")
    if decimal is not None and isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return None
        return int(value) if value == value.to_integral_value() and value.as_tuple().exponent >= 0 \
            else float(value)
    return _walk(_rich_default(value), rich)


def _walk_key(key: Any, rich: bool) -> Any:
    if key is None or type(key) in (bool, int, float):      # json.dumps writes these as text itself
        return key
    if isinstance(key, str):
        return str(key)
    if not rich and not isinstance(key, int | float):
        raise TypeError(f"keys must be str, int, float, bool or None, not {type_name(key)}")
    converted = _walk(key, rich)
    return converted if converted is None or isinstance(converted, str | bool | int | float) \
        else json.dumps(converted)


__all__ = ["Unencodable", "dumps", "encode_plain", "encode_rich", "globals_json", "to_data", "type_name"]

"""Converting columns read from files to declared types, naming the first value that does not fit.

Declared types (``models.ColumnType``) and the Arrow type they become:

===========  ================  ===================================================================
declared     Arrow             accepted input
===========  ================  ===================================================================
int64        int64             integers (any width, if in range), integral floats, decimal text
float64      float64           integers, floats, number text (``1.5``, ``1e3``, ``nan``, ``inf``)
string       string            strings only (a JSON number is not a string)
bool         bool              booleans, text ``true``/``false``/``1``/``0``
timestamp    timestamp[ms]     timestamps (any unit; zoned ones converted to UTC), dates, epoch
                               milliseconds (integers, integral floats, digit text), ISO-8601 text
                               (``2024-01-01T00:00:00.123Z``, ``+02:00`` offsets; no zone = UTC)
===========  ================  ===================================================================

Text is trimmed of surrounding white space for every type but ``string``, and empty text is null.
Precision finer than milliseconds is truncated. Nulls stay null.

:func:`convert` is vectorised; only when a column fails does it look for the offending value, one
element at a time, to raise :class:`ConversionError` with its position.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

ColumnKind = Literal["int64", "float64", "string", "bool", "timestamp"]

ARROW_TYPES: dict[str, pa.DataType] = {
    "int64": pa.int64(),
    "float64": pa.float64(),
    "string": pa.string(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("ms"),
}

_ARTICLE = {"int64": "an int64", "float64": "a float64", "string": "a string", "bool": "a bool",
            "timestamp": "a timestamp"}
_DIGITS = r"^[+-]?[0-9]+$"
_ZONED = r"[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}([.,][0-9]+)?)?(Z|[+-][0-9]{2}(:?[0-9]{2})?)$"


class ConversionError(ValueError):
    """Value number `index` (0-based) of a column is not a `kind`."""

    def __init__(self, index: int, value: Any, kind: str) -> None:
        super().__init__(f"{value!r} is not {describe(kind)}")
        self.index = index
        self.value = value
        self.kind = kind


class _Mismatch(Exception):
    """The input type can never be converted to the wanted kind."""


def describe(kind: str) -> str:
    """``"an int64"``, ``"a timestamp"``, ...: the kind with its article, for messages."""
    return _ARTICLE.get(kind, f"a {kind}")


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _nulls_for_empty(text: pa.Array) -> pa.Array:
    text = pc.utf8_trim_whitespace(text.cast(pa.string()))
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)


def _parse_iso(text: pa.Array) -> pa.Array:
    """ISO-8601 text to naive timestamp[ms] in UTC (zoned values converted, naive taken as UTC)."""
    zoned = pc.fill_null(pc.match_substring_regex(text, _ZONED), False)
    null_text = pa.scalar(None, pa.string())
    last: Exception | None = None
    for unit in ("ns", "us"):  # ns parses up to 9 fraction digits; us reaches beyond year 2262
        try:
            z = pc.cast(pc.if_else(zoned, text, null_text), pa.timestamp(unit, tz="UTC"))
            n = pc.cast(pc.if_else(zoned, null_text, text), pa.timestamp(unit))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            last = exc
            continue
        z = pc.cast(z, pa.timestamp("ms"), safe=False)
        n = pc.cast(n, pa.timestamp("ms"), safe=False)
        return pc.if_else(zoned, z, n)
    assert last is not None
    raise last


def _text_to(text: pa.Array, kind: str) -> pa.Array:
    if kind == "string":
        return text.cast(pa.string())
    text = _nulls_for_empty(text)
    if kind == "timestamp":
        digits = pc.fill_null(pc.match_substring_regex(text, _DIGITS), False)
        null_text = pa.scalar(None, pa.string())
        epoch = pc.cast(pc.cast(pc.if_else(digits, text, null_text), pa.int64()), pa.timestamp("ms"))
        iso = _parse_iso(pc.if_else(digits, null_text, text))
        return pc.if_else(digits, epoch, iso)
    return pc.cast(text, ARROW_TYPES[kind])


def _convert(arr: pa.Array, kind: str) -> pa.Array:
    t = arr.type
    target = ARROW_TYPES[kind]
    if pa.types.is_null(t):
        return pa.nulls(len(arr), target)
    if pa.types.is_dictionary(t):
        return _convert(arr.dictionary_decode(), kind)
    if _is_text(t):
        return _text_to(arr, kind)
    if kind == "string":
        raise _Mismatch
    if pa.types.is_integer(t):
        if kind in ("int64", "float64"):
            return pc.cast(arr, target)
        if kind == "timestamp":
            return pc.cast(pc.cast(arr, pa.int64()), target)
        raise _Mismatch
    if pa.types.is_floating(t):
        if kind == "float64":
            return pc.cast(arr, target)
        if kind == "int64":
            return pc.cast(arr, target)  # safe cast: fails on a fraction or overflow
        if kind == "timestamp":
            return pc.cast(pc.cast(arr, pa.int64()), target)
        raise _Mismatch
    if pa.types.is_boolean(t):
        if kind == "bool":
            return arr
        raise _Mismatch
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        if kind == "timestamp":
            return pc.cast(arr, target, safe=False)
        raise _Mismatch
    raise _Mismatch


def convert(arr: pa.Array | pa.ChunkedArray, kind: str) -> pa.Array:
    """`arr` as the Arrow type of declared `kind` (see the module docstring for what is accepted).

    Raises :class:`ConversionError` naming the first value (index and Python value) that is not
    a `kind`.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    try:
        out = _convert(arr, kind)
        if isinstance(out, pa.ChunkedArray):
            out = out.combine_chunks()
        return out
    except (_Mismatch, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OverflowError):
        pass
    for i in range(len(arr)):
        if not arr[i].is_valid:
            continue
        try:
            _convert(arr.slice(i, 1), kind)
        except (_Mismatch, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OverflowError):
            raise ConversionError(i, arr[i].as_py(), kind) from None
    raise ConversionError(0, arr[0].as_py() if len(arr) else None, kind)  # pragma: no cover - defensive


def fits(value: Any, kind: str) -> bool:
    """Whether one Python value (as parsed from JSON) converts to `kind` by the same rules."""
    if value is None:
        return True
    try:
        arr = pa.array([value])
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return False
    try:
        _convert(arr, kind)
    except (_Mismatch, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OverflowError):
        return False
    return True

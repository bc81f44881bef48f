"""Aggregates over keyed groups (shared by the window operators), and the running ``aggregate`` operator.

An :class:`~sluice.models.AggregateSpec` list is evaluated in two steps:

* *partials*: every aggregate keeps one or two partial columns that merge associatively, so
  partials of any split of the rows combine into the partials of all of them:

  ==========  ==========================  ==========  =====================================
  fn          partial column(s)           merged by   final value (output type)
  ==========  ==========================  ==========  =====================================
  count       ``<name>`` rows (int64)     sum         the partial (int64)
  sum         ``<name>`` sum              sum         the partial (int64 for integer or
                                                      boolean input, float64 for floats)
  min / max   ``<name>`` min / max        min / max   the partial (the input's type)
  mean        ``<name>.sum`` (float64),   sum, sum    sum / count (float64)
              ``<name>.count`` (int64)
  ==========  ==========================  ==========  =====================================

  A row is itself a partial (count 1, sum/min/max its value), so raw rows and merged partials mix
  freely. Merging is vectorised (:meth:`Aggregates.merge`): dense group ids from Arrow's
  dictionary encoding plus numpy reductions when the partials are numeric or temporal and the
  groups fit a dense table, else ``pyarrow.Table.group_by(...).aggregate(...)``; both give the
  same rows.
* *final values*: computed from the merged partials when a result is emitted.

Nulls follow SQL: a null in the aggregated column is ignored (sum/min/max/mean of only nulls is
null); ``count`` without a column counts rows, ``count`` of a column counts its non-null values.

:class:`RunningAggregateOperator` (``aggregate``) keeps the merged partials of every key and, after
each batch, emits one row per key the batch touched with the key's new totals (key columns, then
one column per aggregate). Its state is a keyed table (see :mod:`sluice.engine.keys`): on restore
each subtask keeps exactly the keys it now owns, whatever the previous parallelism.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluice.engine.expressions import BadInputTypeError, MissingColumnError
from sluice.engine.keys import KEY_HASH_COLUMN, filter_owned, key_hashes
from sluice.engine.operators import Operator, OperatorContext, OperatorState
from sluice.engine.stateless import check_key_columns, spec_params
from sluice.models import AggregateSpec
from sluice.models import RunningAggregateOperator as RunningAggregateSpec

#: merges at a call site that could not use dense group ids go to Acero for this many calls
ACERO_PROBE_INTERVAL = 16
#: how each kind of partial merges (a pyarrow hash aggregation)
_MERGE = {"count": "sum", "sum": "sum", "min": "min", "max": "max"}


@dataclass(frozen=True)
class Part:
    """One partial column: its name, how it merges ("count", "sum", "min" or "max")."""

    name: str
    kind: str


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _orderable(t: pa.DataType) -> bool:
    return (_is_numeric(t) or pa.types.is_temporal(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_decimal(t))


class Aggregates:
    """The aggregates of one keyed operator: per-row partials, merging partials by key, and final
    values. `operator`/`operator_id` name the owner in error messages."""

    def __init__(self, operator: str, operator_id: str, specs: Sequence[AggregateSpec]) -> None:
        self.operator = operator
        self.operator_id = operator_id
        self.specs = list(specs)
        self.output_names = [s.name for s in self.specs]
        dupes = sorted({n for n in self.output_names if self.output_names.count(n) > 1})
        if dupes:
            raise ValueError(f"{operator} {operator_id!r}: several aggregates are named {', '.join(map(repr, dupes))} "
                             "(give them distinct 'as' names)")
        self.parts_of: list[list[Part]] = []
        for s in self.specs:
            if s.fn == "mean":
                self.parts_of.append([Part(f"{s.name}.sum", "sum"), Part(f"{s.name}.count", "count")])
            else:
                self.parts_of.append([Part(s.name, "count" if s.fn == "count" else s.fn)])
        self.parts: list[Part] = [p for ps in self.parts_of for p in ps]
        self.part_names = [p.name for p in self.parts]
        self.input_columns = sorted({s.column for s in self.specs if s.column is not None})
        self._calls: dict[str, int] = {}
        self._acero_until: dict[str, int] = {}

    def check_names(self, reserved: Sequence[str]) -> None:
        """Raise ValueError when an output or partial column would collide with `reserved` names
        (key columns, window bounds)."""
        clash = sorted(set(reserved) & (set(self.output_names) | set(self.part_names)))
        if clash:
            raise ValueError(f"{self.operator} {self.operator_id!r}: aggregate column(s) {', '.join(map(repr, clash))} "
                             "collide with key or window columns (rename them with 'as')")

    def check_input(self, schema: pa.Schema) -> None:
        """Raise MissingColumnError / BadInputTypeError (a TypeError) when `schema` cannot feed the
        aggregates."""
        for s in self.specs:
            if s.column is None:
                continue
            idx = schema.get_field_index(s.column)
            if idx < 0:
                raise MissingColumnError(self.operator, self.operator_id, s.column, schema.names,
                                         context=f" (aggregated by {s.fn} as {s.name!r})")
            t = schema.field(idx).type
            if pa.types.is_dictionary(t):
                t = t.value_type
            ok = _is_numeric(t) if s.fn in ("sum", "mean") else _orderable(t) if s.fn in ("min", "max") else True
            if not ok:
                need = "numbers" if s.fn in ("sum", "mean") else "values that can be ordered"
                raise BadInputTypeError(self.operator_id, f"{self.operator} {self.operator_id!r}: {s.fn} of column "
                                        f"{s.column!r} needs {need}, but the column is {schema.field(idx).type}")

    def raw_partials(self, batch: pa.RecordBatch | pa.Table) -> list[pa.Array | pa.ChunkedArray]:
        """Per-row partials of `batch` (one array per part, in `parts` order); call check_input first."""
        n = batch.num_rows
        out: list[pa.Array | pa.ChunkedArray] = []
        ones: pa.Array | None = None
        for s in self.specs:
            col = batch.column(s.column) if s.column is not None else None
            if col is not None and pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            if s.fn == "count":
                if col is None or col.null_count == 0:
                    if ones is None:
                        ones = pa.array(np.ones(n, dtype=np.int64))
                    out.append(ones)
                else:
                    out.append(pc.cast(pc.is_valid(col), pa.int64()))
            elif s.fn == "sum":
                assert col is not None
                out.append(col.cast(pa.float64() if pa.types.is_floating(col.type) else pa.int64()))
            elif s.fn in ("min", "max"):
                assert col is not None
                out.append(col)
            else:  # mean
                assert col is not None
                out.append(col.cast(pa.float64()))
                out.append(pc.cast(pc.is_valid(col), pa.int64()))
        return out

    def merge(self, table: pa.Table, keys: Sequence[str], steps: dict[str, int] | None = None,
              site: str = "", codes: dict[str, tuple[np.ndarray, int]] | None = None) -> pa.Table:
        """Merge the partials of `table` (columns `keys` + the parts) into one row per distinct key;
        returns the key columns followed by the parts.

        `steps` may say that an integer key column only holds multiples of a step (window panes):
        such a column is grouped by arithmetic instead of hashing; `codes` may even give a column's
        codes (values 0..radix-1, equal exactly for equal values) and radix. `site` names the
        caller, whose previous merges choose the method. Rows come out in no particular order.
        """
        n = table.num_rows
        numeric = self.numeric(table.schema)
        calls = self._calls[site] = self._calls.get(site, 0) + 1
        if n and numeric and calls >= self._acero_until.get(site, 0):
            merged, dense = self._merge_numpy(table, keys, steps or {}, codes or {})
            if not dense:
                # Group ids needed a second hashing pass (many keys times many panes): Acero's
                # single pass is cheaper. Use it for a while, then probe again.
                self._acero_until[site] = calls + ACERO_PROBE_INTERVAL
            return merged
        return self._merge_acero(table, keys)

    def numeric(self, schema: pa.Schema) -> bool:
        """Whether the partial columns of `schema` can be merged by :meth:`reduce_by_ids`."""
        return all(_numpy_kind(schema.field(p.name).type) for p in self.parts)

    def reduce_by_ids(self, table: pa.Table, gid: np.ndarray, groups: int) -> list[pa.Array]:
        """The parts of `table` merged per group id (see :meth:`numeric` for when this works)."""
        return [_reduce(table.column(p.name), p.kind, gid, groups) for p in self.parts]

    def _merge_acero(self, table: pa.Table, keys: Sequence[str]) -> pa.Table:
        temp = [f"__p{i}" for i in range(len(self.parts))]
        work = pa.Table.from_arrays([table.column(k) for k in keys] + [table.column(p) for p in self.part_names],
                                    names=[*keys, *temp])
        aggs = [(t, _MERGE[p.kind]) for t, p in zip(temp, self.parts)]
        merged = work.group_by(list(keys), use_threads=False).aggregate(aggs)
        cols = [merged.column(k) for k in keys] + [merged.column(f"{t}_{fn}") for t, fn in aggs]
        return pa.Table.from_arrays(cols, names=[*keys, *self.part_names])

    def _merge_numpy(self, table: pa.Table, keys: Sequence[str], steps: dict[str, int],
                     codes: dict[str, tuple[np.ndarray, int]]) -> tuple[pa.Table, bool]:
        # Acero's group_by costs a fixed ~0.1 ms per call and hashes composite keys slowly; with
        # numeric partials, dense group ids + numpy reductions do the same work several times faster.
        gid, groups, dense = group_ids([table.column(k) for k in keys], [steps.get(k) for k in keys],
                                       [codes.get(k) for k in keys])
        rep = np.empty(groups, dtype=np.int64)
        rep[gid] = np.arange(len(gid), dtype=np.int64)  # any row of a group carries its key
        rep_arr = pa.array(rep)
        cols: list[pa.Array | pa.ChunkedArray] = [table.column(k).take(rep_arr) for k in keys]
        cols.extend(self.reduce_by_ids(table, gid, groups))
        return pa.Table.from_arrays(cols, names=[*keys, *self.part_names]), dense

    def finalize(self, parts: pa.Table | pa.RecordBatch) -> list[pa.Array | pa.ChunkedArray]:
        """The aggregate values (one array per spec, `output_names` order) from merged parts."""
        out: list[pa.Array | pa.ChunkedArray] = []
        for s, ps in zip(self.specs, self.parts_of):
            if s.fn == "mean":
                total, count = parts.column(ps[0].name), parts.column(ps[1].name)
                out.append(pc.divide(total, pc.cast(count, pa.float64())))
            else:
                out.append(parts.column(ps[0].name))
        return out


# ------------------------------------------------------------------------------------------------
# Vectorised grouping


def _fixed_temporal(t: pa.DataType) -> bool:
    """Timestamps, dates, times and durations: temporal types stored as one 32/64-bit integer."""
    return pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t) or pa.types.is_duration(t)


def _numpy_kind(t: pa.DataType) -> bool:
    """Whether partials of type `t` reduce in numpy (numbers, booleans, integer-stored temporal types)."""
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or _fixed_temporal(t)


def _as_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _densify(code: np.ndarray) -> tuple[np.ndarray, int]:
    """Codes 0..n-1 (in order of first appearance) for arbitrary int64 codes."""
    enc = pc.dictionary_encode(pa.array(code))
    return np.asarray(enc.indices).astype(np.int64, copy=False), len(enc.dictionary)


def _dictionary_identity(dictionary: pa.Array) -> tuple[int, ...]:
    return (len(dictionary), dictionary.offset, *(b.address if b is not None else 0 for b in dictionary.buffers()))


def _column_codes(col: pa.Array | pa.ChunkedArray, step: int | None, n: int) -> tuple[np.ndarray, int]:
    """Codes in [0, radix) for one key column, equal exactly for equal values (nulls included)."""
    if step and pa.types.is_integer(col.type) and col.null_count == 0:
        v = np.asarray(_as_array(col)).astype(np.int64, copy=False)
        lo = int(v.min())
        c, rem = np.divmod(v - lo, step)
        radix = int(c.max()) + 1
        if radix <= 8 * n + 1024 and not rem.any():
            return c, radix
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    enc = pc.dictionary_encode(col, null_encoding="encode")
    if isinstance(enc, pa.ChunkedArray) and enc.num_chunks > 1:
        # Arrow encodes the chunks of one array against one shared dictionary; should a version
        # not, the indices of different chunks would not compare: encode the whole column at once.
        shared = {_dictionary_identity(c.dictionary) for c in enc.chunks}
        if len(shared) > 1:
            enc = pc.dictionary_encode(_as_array(col), null_encoding="encode")
    if isinstance(enc, pa.ChunkedArray):
        if enc.num_chunks == 0:
            return np.zeros(0, dtype=np.int64), 1
        if enc.num_chunks == 1:
            indices = np.asarray(enc.chunk(0).indices).astype(np.int64)
        else:
            indices = np.concatenate([np.asarray(c.indices) for c in enc.chunks]).astype(np.int64, copy=False)
        return indices, len(enc.chunk(0).dictionary)
    return np.asarray(enc.indices).astype(np.int64, copy=False), len(enc.dictionary)


def group_ids(columns: Sequence[pa.Array | pa.ChunkedArray], steps: Sequence[int | None],
              precoded: Sequence[tuple[np.ndarray, int] | None] | None = None) -> tuple[np.ndarray, int, bool]:
    """Group id (0..groups-1) of every row for the combination of `columns`' values, the number of
    groups, and whether the ids came from a dense table of column codes (else from hashing the
    combined codes once more). A column with a step (see :meth:`Aggregates.merge`) is coded
    arithmetically, a column with `precoded` (codes, radix) not at all; dense ids are ordered by
    the columns' codes, first column first."""
    n = len(columns[0])
    code: np.ndarray | None = None
    radix = 1
    dense = True
    for i, (col, step) in enumerate(zip(columns, steps)):
        given = precoded[i] if precoded is not None else None
        c, r = given if given is not None else _column_codes(col, step, n)
        if code is None:
            code, radix = c, r
            continue
        if radix * r > 1 << 62:
            code, radix = _densify(code)
            dense = False
        code, radix = code * r + c, radix * r
    assert code is not None
    gid, groups, compact = dense_ids(code, radix)
    return gid, groups, dense and compact


def dense_ids(code: np.ndarray, radix: int) -> tuple[np.ndarray, int, bool]:
    """Ids 0..groups-1 for codes in [0, radix), the number of groups, and whether they came from a
    dense table (ordered by code; else hashed, in order of first appearance)."""
    if radix <= 8 * len(code) + 1024:
        seen = np.zeros(radix, dtype=bool)
        seen[code] = True
        ids = np.cumsum(seen) - 1
        return ids[code], (int(ids[-1]) + 1 if radix else 0), True
    gid, groups = _densify(code)
    return gid, groups, False


def _reduce(col: pa.Array | pa.ChunkedArray, kind: str, gid: np.ndarray, groups: int) -> pa.Array:
    """One partial column merged per group with numpy (see :func:`_numpy_kind` for the types)."""
    arr = _as_array(col)
    t = arr.type
    if _fixed_temporal(t):
        storage: pa.DataType = pa.int32() if t.bit_width == 32 else pa.int64()
        arr = arr.view(storage)
    elif pa.types.is_boolean(t):
        storage = pa.uint8()
        arr = arr.cast(storage)
    else:
        storage = t
    if arr.null_count:
        valid = np.asarray(arr.is_valid())
        values = np.asarray(arr.fill_null(pa.scalar(0, storage)))[valid]
        g = gid[valid]
        has = np.zeros(groups, dtype=bool)
        has[g] = True
    else:
        values, g, has = np.asarray(arr), gid, None
    dtype = values.dtype
    if kind in ("count", "sum"):
        if pa.types.is_floating(storage):
            out = np.bincount(g, weights=values, minlength=groups).astype(dtype, copy=False)
        else:
            out = np.zeros(groups, dtype=dtype)
            np.add.at(out, g, values)
    elif pa.types.is_floating(storage):
        out = np.full(groups, np.nan, dtype=dtype)  # fmin/fmax skip NaN unless all are, like Arrow
        (np.fmin if kind == "min" else np.fmax).at(out, g, values)
    else:
        info = np.iinfo(dtype)
        out = np.full(groups, info.max if kind == "min" else info.min, dtype=dtype)
        (np.minimum if kind == "min" else np.maximum).at(out, g, values)
    result = pa.array(out, type=storage, mask=None if has is None or has.all() else ~has)
    if storage != t:
        result = result.cast(t) if pa.types.is_boolean(t) else result.view(t)
    return result



def state_schema_problem(table: pa.Table, expected: Sequence[str]) -> str | None:
    """Why a restored state table lacks columns an operator needs (None when it has them all)."""
    missing = [c for c in expected if table.schema.get_field_index(c) < 0]
    if missing:
        return (
            f"restored state lacks column(s) {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(table.schema.names)})"
        )
    return None


# ------------------------------------------------------------------------------------------------
# Running aggregate


class _NumpyColumn:
    """Conversion of one part's Arrow values to numpy (values, validity) and back, preserving the
    Arrow type: numbers directly, temporal types through their integer storage, anything else
    (strings, decimals) as Python objects, which per-key state tolerates."""

    def __init__(self, arrow_type: pa.DataType) -> None:
        self.type = arrow_type
        if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
            self.storage: pa.DataType | None = arrow_type
            self.fill: Any = 0
        elif pa.types.is_boolean(arrow_type):
            self.storage, self.fill = arrow_type, False
        elif _fixed_temporal(arrow_type):
            self.storage = pa.int32() if arrow_type.bit_width == 32 else pa.int64()
            self.fill = 0
        else:
            self.storage, self.fill = None, None
        self.dtype: Any = object if self.storage is None else self.storage.to_pandas_dtype()

    def to_numpy(self, arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        valid = np.ones(len(arr), dtype=bool) if arr.null_count == 0 else np.asarray(arr.is_valid())
        if self.storage is None:
            return np.array(arr.to_pylist() + [None], dtype=object)[:-1], valid
        if self.storage != self.type:
            arr = arr.view(self.storage)
        if arr.null_count:
            arr = arr.fill_null(pa.scalar(self.fill, self.storage))
        return arr.to_numpy(zero_copy_only=False), valid

    def empty(self, n: int) -> np.ndarray:
        return np.zeros(n, dtype=self.dtype) if self.storage is not None else np.full(n, None, dtype=object)

    def to_arrow(self, values: np.ndarray, valid: np.ndarray) -> pa.Array:
        mask = None if valid.all() else ~valid
        if self.storage is None:
            return pa.array(values, type=self.type, mask=mask)
        arr = pa.array(values, type=self.storage, mask=mask)
        return arr.view(self.type) if self.storage != self.type else arr


class _NaN:
    """Stands for NaN in key tuples: NaN is unequal to itself, so it cannot be a dict key."""

    def __repr__(self) -> str:
        return "NaN"


_NAN_KEY = _NaN()


def _key_list(table: pa.Table, key: Sequence[str]) -> list[Any]:
    """One hashable value per row for the key columns (the value itself for one column)."""
    columns: list[list[Any]] = []
    for k in key:
        values = table.column(k).to_pylist()
        if pa.types.is_floating(table.column(k).type):
            values = [_NAN_KEY if isinstance(v, float) and math.isnan(v) else v for v in values]
        columns.append(values)
    return columns[0] if len(columns) == 1 else list(zip(*columns))


class RunningAggregateOperator(Operator):
    """``aggregate``: keyed running totals with updating output. After each batch, one row per key
    the batch touched: the key columns, then one column per aggregate with the key's new totals
    (rows of a key appear in the order of its updates, so its newest row is its current value).

    Key columns come from ``params['key']`` (added by the compiler from the upstream key_by).
    State: a keyed table (KEY_HASH_COLUMN, key columns, partial columns)."""

    type_name = "aggregate"

    def __init__(self, operator_id: str, params: dict[str, Any]) -> None:
        super().__init__(operator_id, params)
        self.spec = RunningAggregateSpec.model_validate(spec_params(RunningAggregateSpec, params))
        key = params.get("key")
        if not key:
            raise ValueError(f"aggregate {operator_id!r} is keyed: it needs a key_by upstream (params['key'])")
        self.key: list[str] = [key] if isinstance(key, str) else list(key)
        self.aggs = Aggregates("aggregate", operator_id, self.spec.aggregates)
        self.aggs.check_names(self.key)
        self._index: dict[Any, int] = {}
        self._key_chunks: list[pa.Table] = []
        self._columns: list[_NumpyColumn] | None = None
        self._values: list[np.ndarray] = []
        self._valid: list[np.ndarray] = []
        self._checked: pa.Schema | None = None

    # -------------------------------------------------------------- state in numpy

    def _init_columns(self, parts: pa.Table) -> None:
        self._columns = [_NumpyColumn(parts.schema.field(p).type) for p in self.aggs.part_names]
        self._values = [c.empty(1024) for c in self._columns]
        self._valid = [np.zeros(1024, dtype=bool) for _ in self._columns]

    def _grow(self, n: int) -> None:
        assert self._columns is not None
        size = len(self._valid[0])
        if n <= size:
            return
        new = max(n, 2 * size)
        for i, c in enumerate(self._columns):
            values, valid = c.empty(new), np.zeros(new, dtype=bool)
            values[:size], valid[:size] = self._values[i], self._valid[i]
            self._values[i], self._valid[i] = values, valid

    def _absorb(self, merged: pa.Table) -> np.ndarray:
        """Merge partials with one row per key into the state; returns each row's slot."""
        if self._columns is None:
            self._init_columns(merged)
        assert self._columns is not None
        keys = _key_list(merged, self.key)
        # map/zip keep the per-key work in C: the only Python-level cost is hashing the keys
        slots = np.fromiter(map(self._index.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        new_rows = np.flatnonzero(slots < 0)
        if len(new_rows):
            first = len(self._index)
            new_keys = keys if len(new_rows) == len(keys) else [keys[r] for r in new_rows.tolist()]
            self._index.update(zip(new_keys, range(first, first + len(new_rows))))
            slots[new_rows] = np.arange(first, first + len(new_rows))
            self._key_chunks.append(merged.select(self.key).take(pa.array(new_rows)))
            self._grow(len(self._index))
        for i, (column, part) in enumerate(zip(self._columns, self.aggs.parts)):
            values, valid = column.to_numpy(merged.column(part.name))
            old, old_valid = self._values[i][slots], self._valid[i][slots]
            both = np.flatnonzero(old_valid & valid)
            out = np.where(valid, values, old) if column.storage is not None else _where(valid, values, old)
            if len(both):
                if part.kind in ("count", "sum"):
                    out[both] = old[both] + values[both]
                elif part.kind == "min":
                    out[both] = np.minimum(old[both], values[both])
                else:
                    out[both] = np.maximum(old[both], values[both])
            self._values[i][slots] = out
            self._valid[i][slots] = old_valid | valid
        return slots

    def _parts_at(self, slots: np.ndarray | slice) -> pa.Table:
        assert self._columns is not None
        arrays = [c.to_arrow(self._values[i][slots], self._valid[i][slots]) for i, c in enumerate(self._columns)]
        return pa.Table.from_arrays(arrays, names=self.aggs.part_names)

    # -------------------------------------------------------------- operator

    def open(self, ctx: OperatorContext, restored: list[pa.Table]) -> None:
        super().open(ctx, restored)
        expected = [KEY_HASH_COLUMN, *self.key, *self.aggs.part_names]
        owned: list[pa.Table] = []
        for table in restored:
            if table is None or table.num_rows == 0:
                continue
            problem = state_schema_problem(table, expected)
            if problem:
                raise ValueError(f"aggregate {self.operator_id!r}: {problem}")
            owned.append(filter_owned(table, ctx.parallelism, ctx.subtask_index).select(expected[1:]))
        if owned:
            state = pa.concat_tables(owned)
            if state.num_rows:
                # every key lives in one previous subtask, but merging also makes duplicates harmless
                self._absorb(self.aggs.merge(state, self.key))

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        if batch.num_rows == 0:
            return []
        if self._checked is None or not batch.schema.equals(self._checked):
            check_key_columns("aggregate", self.operator_id, self.key, batch.schema)
            self.aggs.check_input(batch.schema)
            self._checked = batch.schema
        raw = pa.Table.from_arrays([batch.column(k) for k in self.key] + self.aggs.raw_partials(batch),
                                   names=[*self.key, *self.aggs.part_names])
        merged = self.aggs.merge(raw, self.key)
        slots = self._absorb(merged)
        totals = self.aggs.finalize(self._parts_at(slots))
        out = pa.Table.from_arrays([merged.column(k) for k in self.key] + totals,
                                   names=[*self.key, *self.aggs.output_names])
        return [b for b in out.combine_chunks().to_batches() if b.num_rows]

    def snapshot(self, epoch: int) -> OperatorState:
        n = len(self._index)
        if n == 0:
            return OperatorState()
        keys = pa.concat_tables(self._key_chunks).combine_chunks()
        self._key_chunks = [keys]  # compacting the chunk list changes nothing observable
        parts = self._parts_at(slice(0, n))
        table = pa.Table.from_arrays(
            [pa.array(key_hashes(keys, list(self.key)), type=pa.uint64())] + keys.columns + parts.columns,
            names=[KEY_HASH_COLUMN, *self.key, *self.aggs.part_names],
        )
        return OperatorState(table=table)

    @property
    def keys_held(self) -> int:
        """How many keys the operator holds totals for."""
        return len(self._index)


def _where(cond: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = b.copy()
    out[cond] = a[cond]
    return out


__all__ = ["Aggregates", "Part", "RunningAggregateOperator", "dense_ids", "group_ids", "state_schema_problem"]

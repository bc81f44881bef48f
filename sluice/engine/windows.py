"""Keyed event-time windows: ``tumbling_window`` and ``sliding_window``.

Semantics
    * Event time comes from the column named by the ``time`` parameter: a timestamp of any unit
      (converted to milliseconds, rounding down) or an integer number of milliseconds since the
      epoch. A null event time is bad input: the operator fails with a ValueError naming itself,
      the column and the null.
    * Tumbling windows of size S: a record with event time t belongs to the one window
      ``[floor(t / S) * S, +S)``.
    * Sliding windows of size S and slide D (S a multiple of D): a record belongs to every window
      ``[s, s + S)`` with s a multiple of D and ``s <= t < s + S``: S / D windows.
    * Windows are per key (the key columns are ``params['key']``, set by the compiler from the
      upstream key_by). Only windows that received records exist.
    * A window ``[start, end)`` is emitted once, when the watermark (``on_watermark``) reaches
      ``end + allowed_lateness_ms``. Its row holds the key columns, ``window_start`` and
      ``window_end`` (timestamp[ms]), then one column per aggregate, named by ``AggregateSpec.name``
      (see :mod:`sluice.engine.aggregates` for the aggregate semantics). Rows of one emission are
      ordered by ``window_start``; the order of keys within a window is unspecified.
    * A record is *late* when a window it belongs to was already emitted (``end +
      allowed_lateness_ms <= watermark``). Late records are counted in ``late_records`` (also
      :meth:`WindowOperator.metrics`); they are dropped from emitted windows. A sliding-window
      record whose later windows are still open is counted once and still counted in those.
      Records out of order but within the watermark bound are simply counted in their windows.
    * End of stream (``on_end``) is a watermark of +infinity: every remaining window is emitted.
    * The watermark never goes back: an older watermark than the current one is ignored.

How it works (vectorised: no Python work per row)
    The state is made of *panes*: tumbling windows of size D (D = S for tumbling windows). Each
    batch becomes a segment of per-row partial aggregates (key columns, pane start, partials),
    appended as is. When the watermark makes panes ready, the ready rows of every segment are
    cut out (a zero-copy slice when the segment is ordered by time, the usual case), merged once
    per emission (:meth:`sluice.engine.aggregates.Aggregates.merge`: dense group ids and numpy
    reductions, or Arrow's hash aggregation) and turned into windows. Segments are merged into one
    ("compacted") when they hold more than max(COMPACT_MIN_ROWS, twice the rows of the last
    compaction), so memory stays proportional to the number of open (key, pane) pairs. A sliding
    window is the merge of its S / D panes; panes stay in the state until their last window was
    emitted.

Keyed state
    ``snapshot`` returns the pane partials as a table: KEY_HASH_COLUMN (uint64), the key columns,
    the pane start (``window_start`` for tumbling windows, ``pane_start`` for sliding ones; int64
    milliseconds) and the partial columns, with the operator's watermark in the schema metadata
    (``sluice.watermark_ms``; absent before the first watermark). A small state is compacted first
    (one row per key and pane); a large one is written as held, a compacted part plus the partials
    appended since, so a (key, pane) may have a few rows, which merge on restore. ``open``
    receives the tables of every subtask of the previous run, keeps the rows this subtask owns now
    (:func:`sluice.engine.keys.filter_owned`), merges them and restores the lowest of their
    watermarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluice.engine.aggregates import (
    Aggregates,
    dense_ids,
    group_ids,
    state_schema_problem,
)
from sluice.engine.expressions import (
    BadInputError,
    BadInputTypeError,
    MissingColumnError,
)
from sluice.engine.keys import KEY_HASH_COLUMN, filter_owned, key_hashes
from sluice.engine.messages import Watermark
from sluice.engine.operators import Operator, OperatorContext, OperatorState
from sluice.engine.stateless import check_key_columns, spec_params
from sluice.models import SlidingWindowOperator as SlidingWindowSpec
from sluice.models import TumblingWindowOperator as TumblingWindowSpec
from sluice.models import WindowBase

#: schema metadata key holding the operator's watermark in its state table
WATERMARK_METADATA = b"sluice.watermark_ms"
#: the watermark that stands for "end of stream" (+infinity, with room for arithmetic)
END_OF_TIME_MS = 1 << 62
#: pending rows below which segments are never compacted (compaction cost is then negligible)
COMPACT_MIN_ROWS = 1 << 20
#: a snapshot compacts the state first when it holds at most this many rows (cheap: < ~50 ms)
SNAPSHOT_COMPACT_MAX_ROWS = 1 << 18

_UNIT_MS = {"s": (1000, 1), "ms": (1, 1), "us": (1, 1000), "ns": (1, 1_000_000)}


@dataclass(frozen=True)
class _Segment:
    """Partials of some rows: pane start (int64 ms), key columns, parts. `panes` holds the pane
    column as numpy, `lo`/`hi` its bounds; `ordered` says the rows are sorted by pane start (so a
    split is a slice); `merged` that it holds one row per (key, pane)."""

    table: pa.Table
    panes: np.ndarray
    lo: int
    hi: int
    ordered: bool
    merged: bool = False


def _segment(table: pa.Table, panes: np.ndarray, *, merged: bool = False) -> _Segment:
    ordered = bool(len(panes) < 2 or np.all(panes[1:] >= panes[:-1]))
    return _Segment(table, panes, int(panes.min()), int(panes.max()), ordered, merged)


class WindowOperator(Operator):
    """Common machinery of tumbling and sliding windows (see the module docstring). Subclasses set
    `size_ms` and `slide_ms` from their contract."""

    spec_class: ClassVar[type[WindowBase]] = WindowBase
    pane_column: ClassVar[str] = "window_start"

    def __init__(self, operator_id: str, params: dict[str, Any]) -> None:
        super().__init__(operator_id, params)
        self.spec = self.spec_class.model_validate(spec_params(self.spec_class, params))
        key = params.get("key")
        if not key:
            raise ValueError(f"{self.type_name} {operator_id!r} is keyed: it needs a key_by upstream (params['key'])")
        self.key: list[str] = [key] if isinstance(key, str) else list(key)
        self.size_ms: int = self.spec.size_ms
        self.slide_ms: int = getattr(self.spec, "slide_ms", self.spec.size_ms)
        self.lateness_ms: int = self.spec.allowed_lateness_ms
        self.aggs = Aggregates(self.type_name, operator_id, self.spec.aggregates)
        reserved = [*self.key, self.pane_column, "window_start", "window_end"]
        dupes = sorted({k for k in self.key if self.key.count(k) > 1 or k in ("window_start", "window_end")})
        if dupes:
            raise ValueError(f"{self.type_name} {operator_id!r}: key column(s) {', '.join(map(repr, dupes))} "
                             "repeat or collide with window_start/window_end")
        self.aggs.check_names(reserved)
        #: current watermark in ms (None until the first one)
        self.watermark: int | None = None
        #: records dropped (or, for sliding windows, partly dropped) for arriving after their window
        self.late_records: int = 0
        self._segments: list[_Segment] = []
        self._rows = 0
        self._compacted_rows = 0
        self._checked: pa.Schema | None = None
        # the pane first: merged partials then come out ordered by it
        self._group = [self.pane_column, *self.key]
        self._steps = {self.pane_column: self.slide_ms, "window_start": self.slide_ms}

    # -------------------------------------------------------------- lifecycle

    def open(self, ctx: OperatorContext, restored: list[pa.Table]) -> None:
        super().open(ctx, restored)
        columns = [*self._group, *self.aggs.part_names]
        owned: list[pa.Table] = []
        watermarks: list[int | None] = []
        for table in restored:
            if table is None:
                continue
            watermarks.append(_watermark_of(table))
            if table.num_rows == 0:
                continue
            problem = state_schema_problem(table, [KEY_HASH_COLUMN, *columns])
            if problem:
                raise ValueError(f"{self.type_name} {self.operator_id!r}: {problem}")
            mine = filter_owned(table, ctx.parallelism, ctx.subtask_index).select(columns)
            if mine.num_rows:
                owned.append(mine)
        if watermarks:
            # the lowest one: a record this subtask still has to accept is never taken for late
            self.watermark = None if any(w is None for w in watermarks) else min(w for w in watermarks if w is not None)
        if owned:
            state = pa.concat_tables(owned)
            panes = _column_numpy(state, self.pane_column)
            if np.any(np.mod(panes, self.slide_ms)):
                raise ValueError(f"{self.type_name} {self.operator_id!r}: restored state has panes that are not "
                                 f"multiples of {self.slide_ms} ms: it was written with another window size or slide")
            self._add(_segment(state, panes))
            self._compact()

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        if batch.num_rows == 0:
            return []
        if self._checked is None or not batch.schema.equals(self._checked):
            self._check_schema(batch.schema)
            self._checked = batch.schema
        t = self._event_times(batch)
        panes = t - np.mod(t, self.slide_ms)
        if self.watermark is not None:
            lo = int(panes.min())
            if lo + self.slide_ms + self.lateness_ms <= self.watermark:
                self.late_records += int(np.count_nonzero(panes + (self.slide_ms + self.lateness_ms) <= self.watermark))
                keep = panes + (self.size_ms + self.lateness_ms) > self.watermark
                if not keep.all():
                    if not keep.any():
                        return []
                    batch = batch.filter(pa.array(keep))
                    panes = panes[keep]
        raw = pa.Table.from_arrays(
            [pa.array(panes)] + [batch.column(k) for k in self.key] + self.aggs.raw_partials(batch),
            names=[*self._group, *self.aggs.part_names],
        )
        self._add(_segment(raw, panes))
        if self._rows > max(COMPACT_MIN_ROWS, 2 * self._compacted_rows):
            self._compact()
        return []

    def on_watermark(self, watermark: Watermark) -> list[pa.RecordBatch]:
        wm = int(watermark.ts_ms)
        if self.watermark is not None and wm <= self.watermark:
            return []
        previous, self.watermark = self.watermark, wm
        return self._emit(previous, wm)

    def on_end(self) -> list[pa.RecordBatch]:
        previous = self.watermark
        if previous is not None and previous >= END_OF_TIME_MS:
            return []
        self.watermark = END_OF_TIME_MS
        return self._emit(previous, END_OF_TIME_MS)

    def snapshot(self, epoch: int) -> OperatorState:
        if self._rows <= SNAPSHOT_COMPACT_MAX_ROWS:
            self._compact()
        # A large state is written as held: its compacted part plus the partials appended since
        # (at most max(COMPACT_MIN_ROWS, 2x) the compacted rows). Compacting it here would hash
        # every key string again, about 0.5 s per million rows, while the barrier waits.
        if self._segments:
            columns = [*self.key, self.pane_column, *self.aggs.part_names]
            state = pa.concat_tables([s.table.select(columns) for s in self._segments])
            hashes = pa.array(
                np.concatenate([key_hashes(s.table, list(self.key)) for s in self._segments]), type=pa.uint64()
            )
            table = pa.Table.from_arrays([hashes] + state.columns, names=[KEY_HASH_COLUMN, *state.column_names])
        else:
            table = pa.Table.from_arrays([pa.array([], type=pa.uint64())], names=[KEY_HASH_COLUMN])
        metadata = {} if self.watermark is None else {WATERMARK_METADATA: str(self.watermark).encode()}
        return OperatorState(table=table.replace_schema_metadata(metadata))

    def metrics(self) -> dict[str, float]:
        """Counters for the task to publish: ``late_records``."""
        return {"late_records": float(self.late_records)}

    @property
    def pending_rows(self) -> int:
        """Rows of partials held (for tests and diagnostics)."""
        return self._rows

    # -------------------------------------------------------------- input

    def _check_schema(self, schema: pa.Schema) -> None:
        check_key_columns(self.type_name, self.operator_id, self.key, schema)
        idx = schema.get_field_index(self.spec.time)
        if idx < 0:
            raise MissingColumnError(
                self.type_name, self.operator_id, self.spec.time, schema.names, role="event-time column"
            )
        t = schema.field(idx).type
        if not (pa.types.is_timestamp(t) or pa.types.is_integer(t)):
            raise BadInputTypeError(self.operator_id, f"{self.type_name} {self.operator_id!r}: event-time column "
                                    f"{self.spec.time!r} is {t}; it must be a timestamp or integer milliseconds")
        self.aggs.check_input(schema)

    def _event_times(self, batch: pa.RecordBatch) -> np.ndarray:
        col = batch.column(self.spec.time)
        if col.null_count:
            row = int(pc.index(col.is_null(), True).as_py())
            raise BadInputError(self.operator_id, f"{self.type_name} {self.operator_id!r}: event-time column "
                                f"{self.spec.time!r} is null (row {row} of the batch)")
        if pa.types.is_timestamp(col.type):
            mul, div = _UNIT_MS[col.type.unit]
            t = np.asarray(col.view(pa.int64()))
            if mul != 1:
                t = t * mul
            elif div != 1:
                t = np.floor_divide(t, div)
            return t
        return np.asarray(col.cast(pa.int64()))

    # -------------------------------------------------------------- state

    def _add(self, seg: _Segment) -> None:
        self._segments.append(seg)
        self._rows += seg.table.num_rows

    def _compact(self) -> None:
        if not self._segments:
            self._compacted_rows = 0
            return
        if len(self._segments) == 1 and self._segments[0].merged:
            self._compacted_rows = self._rows
            return
        merged = self._merge_segments([s.table for s in self._segments], [s.panes for s in self._segments], "compact")
        self._segments, self._rows = [], 0
        if merged.num_rows:
            merged = merged.combine_chunks()
            self._add(_segment(merged, _column_numpy(merged, self.pane_column), merged=True))
        self._compacted_rows = self._rows

    def _merge_segments(self, tables: list[pa.Table], panes: list[np.ndarray], site: str) -> pa.Table:
        """Merge partials by (pane, key); pane codes come from the segments' numpy panes (every
        pane is a multiple of the slide, so arithmetic codes them exactly)."""
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        values = panes[0] if len(panes) == 1 else np.concatenate(panes)
        codes: dict[str, tuple[np.ndarray, int]] = {}
        if len(values):
            lo = int(values.min())
            radix = (int(values.max()) - lo) // self.slide_ms + 1
            if radix <= 8 * len(values) + 1024:
                codes[self.pane_column] = ((values - lo) // self.slide_ms, radix)
        return self.aggs.merge(table, self._group, self._steps, site, codes)

    def _take_ready(self, threshold: int) -> tuple[list[pa.Table], list[np.ndarray]]:
        """Cut the rows with pane start <= threshold out of every segment."""
        ready: list[pa.Table] = []
        ready_panes: list[np.ndarray] = []
        kept: list[_Segment] = []
        for seg in self._segments:
            if seg.lo > threshold:
                kept.append(seg)
            elif seg.hi <= threshold:
                ready.append(seg.table)
                ready_panes.append(seg.panes)
            else:
                panes = seg.panes
                if seg.ordered:
                    cut = int(np.searchsorted(panes, threshold, side="right"))
                    ready.append(seg.table.slice(0, cut))
                    ready_panes.append(panes[:cut])
                    rest, rest_panes = seg.table.slice(cut), panes[cut:]
                else:
                    mask = panes <= threshold
                    ready.append(seg.table.filter(pa.array(mask)))
                    ready_panes.append(panes[mask])
                    rest, rest_panes = seg.table.filter(pa.array(~mask)), panes[~mask]
                kept.append(_Segment(rest, rest_panes, int(rest_panes.min()), seg.hi, seg.ordered, seg.merged))
        self._segments = kept
        self._rows = sum(s.table.num_rows for s in kept)
        return ready, ready_panes

    # -------------------------------------------------------------- output

    def _emit(self, previous: int | None, wm: int) -> list[pa.RecordBatch]:
        threshold = wm - self.slide_ms - self.lateness_ms  # panes up to here are complete
        if not self._segments or min(s.lo for s in self._segments) > threshold:
            return []
        ready, ready_panes = self._take_ready(threshold)
        panes = self._merge_segments(ready, ready_panes, "emit")
        if self.slide_ms == self.size_ms:
            windows = panes.rename_columns(["window_start", *self.key, *self.aggs.part_names])
        else:
            windows = self._slide(panes, previous, wm)
        # the state shrank: the next compaction is due relative to its new size
        self._compacted_rows = min(self._compacted_rows, self._rows)
        return self._output(windows)

    def _slide(self, panes: pa.Table, previous: int | None, wm: int) -> pa.Table:
        """Windows closing in (previous, wm] from merged panes; panes whose later windows are still
        open go back into the state."""
        starts = _column_numpy(panes, self.pane_column)
        still_open = starts + (self.size_ms + self.lateness_ms) > wm
        if still_open.any():
            back = panes.filter(pa.array(still_open))
            self._add(_segment(back, starts[still_open], merged=True))
        # window s contains pane p for s in (p - S, p]; emitted when s + S + L <= wm
        low = -END_OF_TIME_MS if previous is None else previous
        rows_parts: list[np.ndarray] = []
        start_parts: list[np.ndarray] = []
        for k in range(self.size_ms // self.slide_ms):
            s = starts - k * self.slide_ms
            end = s + (self.size_ms + self.lateness_ms)
            idx = np.flatnonzero((end > low) & (end <= wm))
            if len(idx):
                rows_parts.append(idx)
                start_parts.append(s[idx])
        names = ["window_start", *self.key, *self.aggs.part_names]
        if not rows_parts:
            return panes.slice(0, 0).rename_columns(names)
        rows, window_starts = np.concatenate(rows_parts), np.concatenate(start_parts)
        if not self.aggs.numeric(panes.schema):
            copies = panes.take(pa.array(rows))
            copies = copies.set_column(
                copies.schema.get_field_index(self.pane_column), "window_start", pa.array(window_starts)
            )
            return self.aggs.merge(copies, ["window_start", *self.key], self._steps, "slide")
        # Each pane feeds S/D windows: code the keys of the (fewer) panes once, then group the
        # copies by arithmetic on (window, key code) instead of hashing every copy's key again.
        key_ids, n_keys, _ = group_ids([panes.column(k) for k in self.key], [None] * len(self.key))
        window_code = (window_starts - int(window_starts.min())) // self.slide_ms
        gid, groups, _ = dense_ids(window_code * n_keys + key_ids[rows], (int(window_code.max()) + 1) * n_keys)
        rep = np.empty(groups, dtype=np.int64)
        rep[gid] = np.arange(len(gid), dtype=np.int64)
        firsts = pa.array(rows[rep])
        copies = panes.select(self.aggs.part_names).take(pa.array(rows))
        return pa.Table.from_arrays(
            [pa.array(window_starts[rep])] + [panes.column(k).take(firsts) for k in self.key]
            + self.aggs.reduce_by_ids(copies, gid, groups),
            names=names,
        )

    def _output(self, windows: pa.Table) -> list[pa.RecordBatch]:
        if windows.num_rows == 0:
            return []
        starts = _column_numpy(windows, "window_start")
        if len(starts) > 1 and not np.all(starts[1:] >= starts[:-1]):
            order = np.argsort(starts, kind="stable")
            windows = windows.take(pa.array(order))
            starts = starts[order]
        ts = pa.timestamp("ms")
        columns = ([windows.column(k) for k in self.key]
                   + [pa.array(starts, type=ts), pa.array(starts + self.size_ms, type=ts)]
                   + self.aggs.finalize(windows))
        names = [*self.key, "window_start", "window_end", *self.aggs.output_names]
        arrays = [_single(c) for c in columns]
        return [pa.RecordBatch.from_arrays(arrays, names=names)]


class TumblingWindowOperator(WindowOperator):
    """``tumbling_window``: keyed windows ``[floor(t / size) * size, +size)``."""

    type_name = "tumbling_window"
    spec_class = TumblingWindowSpec
    pane_column = "window_start"


class SlidingWindowOperator(WindowOperator):
    """``sliding_window``: keyed windows of ``size_ms`` starting every ``slide_ms``."""

    type_name = "sliding_window"
    spec_class = SlidingWindowSpec
    pane_column = "pane_start"


def _single(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _column_numpy(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    return np.asarray(col.chunk(0) if col.num_chunks == 1 else col.combine_chunks())


def _watermark_of(table: pa.Table) -> int | None:
    """The watermark a state table was written with (None when it had none)."""
    raw = (table.schema.metadata or {}).get(WATERMARK_METADATA)
    return int(raw) if raw else None


__all__ = [
    "END_OF_TIME_MS",
    "WATERMARK_METADATA",
    "SlidingWindowOperator",
    "TumblingWindowOperator",
    "WindowOperator",
]

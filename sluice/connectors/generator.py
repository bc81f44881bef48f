"""The ``generator`` source: deterministic rows, a pure function of (split, seq) and its parameters.

Columns and formula (all integers are unsigned 64-bit with wrap-around, ``>>`` is a logical shift):

=========  ===================  ===============================================================
column     type                 value for row ``seq`` (0, 1, 2, ...) of split ``split``
=========  ===================  ===============================================================
split      int64                ``split``
seq        int64                ``seq``
key        string               ``"key-" + str(h % keys)``
ts         timestamp[ms] (UTC)  ``2024-01-01T00:00:00Z + seq milliseconds``
value      int64                ``(h >> 32) % 1000``
=========  ===================  ===============================================================

where ``h = splitmix64(split * 0x9E3779B97F4A7C15 + seq)`` and ``splitmix64`` is the finaliser::

    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z =  z ^ (z >> 31)

Parameters (``models.GeneratorOperator``): ``splits`` independent sequences; ``keys`` distinct keys;
``limit`` rows per split (absent = unbounded); ``rate`` rows per second per split (absent = as fast
as possible); ``batch_size`` rows per emitted batch at most.

Splits are owned by subtasks as ``split s -> subtask s % parallelism``. The state is the next offset
of every owned split (table ``split: int64, offset: int64``); on restore a subtask reads the tables
of every previous subtask and keeps the offsets of the splits it now owns, so a rescale neither
loses nor repeats a row.

Event time is column ``ts``. Each owned split that still has rows to produce is tracked by a
:class:`~sluice.engine.watermarks.WatermarkTracker` with the operator's ``out_of_orderness_ms``
(the generator itself is in order per split, so 0 is exact); a split that has not emitted yet since
the subtask opened holds the watermark back and a finished split (``limit`` reached) no longer does.
:meth:`GeneratorSource.watermark` reports the watermark when it advances.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sluice.engine.operators import OperatorContext, OperatorState
from sluice.engine.sources import FINISHED, Poll, Source
from sluice.engine.watermarks import WatermarkTracker
from sluice.models import GeneratorOperator

SPLIT_STRIDE = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
VALUE_MODULUS = 1000
TS_BASE_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
TS_STEP_MS = 1
KEY_PREFIX = "key-"
#: when rate limited, wait until about this much time's worth of rows is due, so that a high rate
#: is met with reasonably sized batches instead of one row per poll
PACE_INTERVAL_S = 0.01

SCHEMA = pa.schema(
    [
        ("split", pa.int64()),
        ("seq", pa.int64()),
        ("key", pa.string()),
        ("ts", pa.timestamp("ms")),
        ("value", pa.int64()),
    ]
)
STATE_SCHEMA = pa.schema([("split", pa.int64()), ("offset", pa.int64())])

_U64 = (1 << 64) - 1


@lru_cache(maxsize=16)
def _key_names(keys: int) -> pa.Array:
    return pa.array([f"{KEY_PREFIX}{i}" for i in range(keys)], type=pa.string())


def _keys_of(params: GeneratorOperator | Mapping[str, Any]) -> int:
    if isinstance(params, GeneratorOperator):
        return params.keys
    return int(params.get("keys", GeneratorOperator.model_fields["keys"].default))


def generator_rows(
    params: GeneratorOperator | Mapping[str, Any], split: int, start: int, stop: int
) -> pa.RecordBatch:
    """Rows ``seq in [start, stop)`` of `split`, exactly as the source emits them (vectorised)."""
    keys = _keys_of(params)
    n = max(0, stop - start)
    seq = np.arange(start, start + n, dtype=np.uint64)
    z = seq + np.uint64((split * SPLIT_STRIDE) & _U64)  # uint64 arithmetic wraps around
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    h = z ^ (z >> np.uint64(31))
    key_idx = (h % np.uint64(keys)).astype(np.int64)
    value = ((h >> np.uint64(32)) % np.uint64(VALUE_MODULUS)).astype(np.int64)
    seq_i = seq.astype(np.int64)
    ts = seq_i * TS_STEP_MS + TS_BASE_MS
    return pa.RecordBatch.from_arrays(
        [
            pa.array(np.full(n, split, dtype=np.int64)),
            pa.array(seq_i),
            pc.take(_key_names(keys), pa.array(key_idx)),
            pa.array(ts, type=pa.int64()).cast(pa.timestamp("ms")),
            pa.array(value),
        ],
        schema=SCHEMA,
    )


def owned_splits(splits: int, parallelism: int, subtask_index: int) -> list[int]:
    """Splits read by one subtask: split s belongs to subtask s % parallelism."""
    return [s for s in range(splits) if s % parallelism == subtask_index]


class GeneratorSource(Source):
    """Emits :func:`generator_rows` for its splits, round-robin, optionally rate limited."""

    type_name = "generator"

    def __init__(self, operator_id: str, params: dict[str, Any]) -> None:
        super().__init__(operator_id, params)
        self.spec = GeneratorOperator.model_validate(params)
        self.offsets: dict[int, int] = {}
        self._active: list[int] = []
        self._next = 0  # round-robin position in _active
        self._t0: float | None = None  # rate pacing starts at the first poll
        self._emitted: dict[int, int] = {}  # rows per split since _t0
        self._watermarks = WatermarkTracker(self.spec.out_of_orderness_ms)

    def open(self, ctx: OperatorContext, restored: list[pa.Table]) -> None:
        super().open(ctx, restored)
        owned = owned_splits(self.spec.splits, ctx.parallelism, ctx.subtask_index)
        self.offsets = {s: 0 for s in owned}
        seen: dict[int, int] = {}
        for table in restored:
            for split, offset in zip(table.column("split").to_pylist(), table.column("offset").to_pylist()):
                if split in seen and seen[split] != offset:
                    # Two subtasks claimed the same split: the checkpoint is inconsistent.
                    raise ValueError(f"generator {self.operator_id!r}: split {split} restored twice "
                                     f"with offsets {seen[split]} and {offset}")
                seen[split] = offset
                if split in self.offsets:
                    self.offsets[split] = offset
        self._active = [s for s in owned if not self._done(s)]
        self._emitted = {s: 0 for s in owned}
        self._watermarks = WatermarkTracker(self.spec.out_of_orderness_ms)
        for split in self._active:
            self._watermarks.add_split(split)

    def _done(self, split: int) -> bool:
        return self.spec.limit is not None and self.offsets[split] >= self.spec.limit

    def _room(self, split: int) -> int:
        room = self.spec.batch_size
        if self.spec.limit is not None:
            room = min(room, self.spec.limit - self.offsets[split])
        return room

    def poll(self, now: float) -> Poll:
        if not self._active:
            return FINISHED
        rate = self.spec.rate
        if rate is not None and self._t0 is None:
            self._t0 = now
        idle = math.inf
        for step in range(len(self._active)):
            i = (self._next + step) % len(self._active)
            split = self._active[i]
            n = self._room(split)
            if rate is not None:
                assert self._t0 is not None
                due = int((now - self._t0) * rate) - self._emitted[split]
                want = max(1, min(n, math.ceil(rate * PACE_INTERVAL_S)))
                if due < want:
                    idle = min(idle, (self._emitted[split] + want) / rate - (now - self._t0))
                    continue
                n = min(n, due)
            start = self.offsets[split]
            batch = generator_rows(self.spec, split, start, start + n)
            self.offsets[split] = start + n
            self._emitted[split] += n
            if n > 0:
                self._watermarks.observe(split, TS_BASE_MS + (start + n - 1) * TS_STEP_MS)
            if self._done(split):
                self._watermarks.finish(split)
                del self._active[i]
                self._next = i % len(self._active) if self._active else 0
            else:
                self._next = (i + 1) % len(self._active)
            return Poll(batch=batch)
        return Poll(idle_s=max(idle, 1e-4))

    def watermark(self) -> int | None:
        """Event time (ms) below which no later row of this subtask falls, when it advanced: the
        lowest ``ts`` reached by the unfinished owned splits minus ``out_of_orderness_ms``; None
        until every unfinished split has emitted, and when it did not move."""
        return self._watermarks.advance()

    def snapshot(self, epoch: int) -> OperatorState:
        splits = sorted(self.offsets)
        table = pa.table(
            {"split": pa.array(splits, pa.int64()), "offset": pa.array([self.offsets[s] for s in splits], pa.int64())},
            schema=STATE_SCHEMA,
        )
        return OperatorState(table=table)

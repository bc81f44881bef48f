"""Keyed state of windows and running aggregates: snapshot, rescale, restore.

A run interrupted by a checkpoint and resumed with another parallelism must give exactly the rows
of an uninterrupted run: no key lost, none duplicated.
"""

from __future__ import annotations

import io
import random
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from pyarrow import ipc

from sluice.engine.aggregates import RunningAggregateOperator
from sluice.engine.keys import KEY_HASH_COLUMN, key_hashes, owners
from sluice.engine.messages import Watermark
from sluice.engine.operators import Operator, OperatorContext
from sluice.engine.registry import build_operator
from sluice.engine.windows import WATERMARK_METADATA, WindowOperator

WINDOW_AGGREGATES = [{"fn": "count"}, {"fn": "sum", "column": "value"}, {"fn": "min", "column": "value"},
                     {"fn": "max", "column": "value"}, {"fn": "mean", "column": "value"}]

Event = tuple[str, Any]


def params(kind: str) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "op", "type": kind, "key": ["k"]}
    if kind == "tumbling_window":
        base.update(time="t", size_ms=50, allowed_lateness_ms=5, aggregates=WINDOW_AGGREGATES)
    elif kind == "sliding_window":
        base.update(time="t", size_ms=60, slide_ms=20, aggregates=WINDOW_AGGREGATES)
    else:
        base.update(aggregates=[{"fn": "count"}, {"fn": "sum", "column": "value"}, {"fn": "max", "column": "k2"},
                                {"fn": "mean", "column": "value"}])
    return base


def events(seed: int = 7, n_batches: int = 40) -> list[Event]:
    rng = random.Random(seed)
    out: list[Event] = []
    clock = 0
    for _ in range(n_batches):
        n = rng.randint(1, 60)
        keys = [f"key-{rng.randint(0, 80)}" for _ in range(n)]
        out.append(("batch", pa.RecordBatch.from_arrays(
            [pa.array(keys), pa.array([clock + rng.randint(-30, 30) for _ in range(n)], pa.int64()),
             pa.array([rng.choice([None, *range(-50, 50)]) for _ in range(n)], pa.int64()),
             pa.array([rng.choice(["x", "y", None]) for _ in range(n)])],
            names=["k", "t", "value", "k2"])))
        clock += rng.randint(0, 25)
        if rng.random() < 0.6:
            out.append(("wm", clock - 20))
    return out


def open_all(kind: str, parallelism: int, restored: list[pa.Table]) -> list[Operator]:
    ops = []
    for i in range(parallelism):
        op = build_operator("op", params(kind))
        op.open(OperatorContext("job", 2, "op", i, parallelism, restore_epoch=1 if restored else None), restored)
        ops.append(op)
    return ops


def drive(ops: list[Operator], evs: list[Event], out: list[dict[str, Any]]) -> None:
    """Route each batch's rows to their owners (as the task's shuffle does); broadcast watermarks."""
    p = len(ops)
    for kind, payload in evs:
        if kind == "batch":
            who = owners(key_hashes(payload, ["k"]), p)
            for i, op in enumerate(ops):
                part = payload.filter(pa.array(who == i))
                if part.num_rows:
                    for b in op.process(part):
                        out.extend(b.to_pylist())
        else:
            for op in ops:
                for b in op.on_watermark(Watermark(payload)):
                    out.extend(b.to_pylist())


def through_ipc(table: pa.Table) -> pa.Table:
    """The table as a checkpoint store writes and reads it (Arrow IPC file)."""
    sink = io.BytesIO()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return ipc.open_file(pa.BufferReader(sink.getvalue())).read_all()


def ended(ops: list[Operator], out: list[dict[str, Any]]) -> None:
    for op in ops:
        for b in op.on_end():
            out.extend(b.to_pylist())


def canonical(rows: list[dict[str, Any]]) -> list[tuple]:
    return sorted((tuple((k, round(v, 9) if isinstance(v, float) else v) for k, v in sorted(r.items())) for r in rows),
                  key=repr)


def per_key(rows: list[dict[str, Any]]) -> dict[str, list[tuple]]:
    seqs: dict[str, list[tuple]] = defaultdict(list)
    for r in rows:
        seqs[r["k"]].append(tuple(round(v, 9) if isinstance(v, float) else v for v in r.values()))
    return dict(seqs)


def late(ops: list[Operator]) -> int:
    return sum(getattr(op, "late_records", 0) for op in ops)


@pytest.mark.parametrize("kind", ["tumbling_window", "sliding_window", "aggregate"])
@pytest.mark.parametrize("new_parallelism", [5, 1])
def test_rescaled_restore_gives_the_uninterrupted_output(kind: str, new_parallelism: int) -> None:
    evs = events()
    cut = len(evs) // 2

    reference: list[dict[str, Any]] = []
    whole = open_all(kind, 1, [])
    drive(whole, evs[:cut], reference)
    whole[0].snapshot(1)  # a snapshot must not change what follows
    drive(whole, evs[cut:], reference)
    ended(whole, reference)

    got: list[dict[str, Any]] = []
    before = open_all(kind, 2, [])
    drive(before, evs[:cut], got)
    tables = [through_ipc(op.snapshot(1).table) for op in before if op.snapshot(1).table is not None]
    for op in before:
        op.close()
    after = open_all(kind, new_parallelism, tables)
    drive(after, evs[cut:], got)
    ended(after, got)

    assert len(reference) > 50
    if kind == "aggregate":
        # updating output: every key sees the same sequence of totals
        assert per_key(got) == per_key(reference)
    else:
        assert canonical(got) == canonical(reference)
        assert late(before) + late(after) == late(whole)


@pytest.mark.parametrize("kind", ["tumbling_window", "aggregate"])
def test_restored_subtasks_split_the_keys_exactly(kind: str) -> None:
    evs = events(seed=3)
    before = open_all(kind, 2, [])
    drive(before, [e for e in evs if e[0] == "batch"], [])
    tables = [op.snapshot(1).table for op in before]
    total = sum(t.num_rows for t in tables)
    after = open_all(kind, 5, tables)
    states = [op.snapshot(2).table for op in after]
    states = [t for t in states if t is not None]
    assert sum(t.num_rows for t in states) == total
    keys = [set(t.column("k").to_pylist()) for t in states]
    assert sum(len(k) for k in keys) == len(set().union(*keys))  # no key in two subtasks
    for i, t in enumerate(after):
        table = t.snapshot(3).table
        if table is not None and table.num_rows:
            assert set(owners(np.asarray(table.column(KEY_HASH_COLUMN)), 5)) == {i}


def test_window_state_table_layout_and_watermark() -> None:
    op = open_all("tumbling_window", 1, [])[0]
    assert isinstance(op, WindowOperator)
    op.process(pa.RecordBatch.from_arrays([pa.array(["a", "b", "a"]), pa.array([1, 2, 70], pa.int64()),
                                           pa.array([1, 2, 3], pa.int64()), pa.array(["x", "y", "z"])],
                                          names=["k", "t", "value", "k2"]))
    op.on_watermark(Watermark(30))
    table = op.snapshot(1).table
    assert table.schema.names[:3] == [KEY_HASH_COLUMN, "k", "window_start"]
    assert table.schema.field(KEY_HASH_COLUMN).type == pa.uint64()
    assert table.schema.metadata[WATERMARK_METADATA] == b"30"
    assert sorted(zip(table.column("k").to_pylist(), table.column("window_start").to_pylist(),
                      table.column("count").to_pylist())) == [("a", 0, 1), ("a", 50, 1), ("b", 0, 1)]
    # the live state still works after the snapshot
    assert sorted(r["k"] for b in op.on_watermark(Watermark(60)) for r in b.to_pylist()) == ["a", "b"]


def test_restore_takes_the_lowest_watermark() -> None:
    a, b = open_all("tumbling_window", 2, [])
    a.on_watermark(Watermark(200))
    b.on_watermark(Watermark(100))
    restored = open_all("tumbling_window", 1, [a.snapshot(1).table, b.snapshot(1).table])[0]
    assert isinstance(restored, WindowOperator)
    assert restored.watermark == 100
    fresh = open_all("tumbling_window", 1, [open_all("tumbling_window", 1, [])[0].snapshot(1).table])[0]
    assert isinstance(fresh, WindowOperator) and fresh.watermark is None
    # a record late for 200 but not for 100 is accepted
    restored.process(pa.RecordBatch.from_arrays([pa.array(["a"]), pa.array([150], pa.int64()),
                                                 pa.array([1], pa.int64()), pa.array(["x"])],
                                                names=["k", "t", "value", "k2"]))
    assert restored.late_records == 0
    assert [r["count"] for b in restored.on_end() for r in b.to_pylist()] == [1]


def test_running_aggregate_updating_output() -> None:
    op = open_all("aggregate", 1, [])[0]
    assert isinstance(op, RunningAggregateOperator)

    def feed(keys: list[str], values: list[int | None]) -> list[dict[str, Any]]:
        b = pa.RecordBatch.from_arrays([pa.array(keys), pa.array(values, pa.int64()), pa.array(["x"] * len(keys))],
                                       names=["k", "value", "k2"])
        return [r for out in op.process(b) for r in out.to_pylist()]

    first = feed(["a", "b", "a"], [1, 2, 3])
    assert sorted((r["k"], r["count"], r["sum_value"], r["mean_value"]) for r in first) == [
        ("a", 2, 4, 2.0), ("b", 1, 2, 2.0)
    ]
    assert list(first[0]) == ["k", "count", "sum_value", "max_k2", "mean_value"]
    second = feed(["b", "c"], [None, 5])  # only touched keys come out, with their new totals
    assert sorted((r["k"], r["count"], r["sum_value"]) for r in second) == [("b", 2, 2), ("c", 1, 5)]
    assert feed([], []) == []
    assert op.keys_held == 3


def test_running_aggregate_snapshot_restores_totals() -> None:
    op = open_all("aggregate", 1, [])[0]
    b = pa.RecordBatch.from_arrays([pa.array(["a", "b"]), pa.array([1, 2], pa.int64()), pa.array(["x", "y"])],
                                   names=["k", "value", "k2"])
    op.process(b)
    restored = open_all("aggregate", 1, [through_ipc(op.snapshot(1).table)])[0]
    out = [r for x in restored.process(b) for r in x.to_pylist()]
    assert sorted((r["k"], r["count"], r["sum_value"], r["max_k2"]) for r in out) == [
        ("a", 2, 2, "x"), ("b", 2, 4, "y")
    ]
    assert open_all("aggregate", 1, [])[0].snapshot(1).table is None  # nothing held, nothing stored


def test_many_keys_snapshot_and_restore() -> None:
    """100k keys of window state survive a snapshot and a restore into 3 subtasks."""
    n = 100_000
    op = open_all("tumbling_window", 1, [])[0]
    keys = pa.array([f"user-{i}" for i in range(n)])
    op.process(pa.RecordBatch.from_arrays([keys, pa.array(np.arange(n) % 40, pa.int64()),
                                           pa.array(np.ones(n, dtype=np.int64)), pa.nulls(n, pa.string())],
                                          names=["k", "t", "value", "k2"]))
    table = op.snapshot(1).table
    assert table.num_rows == n
    after = open_all("tumbling_window", 3, [table])
    counts = [sum(r["count"] for b in a.on_end() for r in b.to_pylist()) for a in after]
    assert sum(counts) == n and min(counts) > 0

"""Tumbling and sliding windows: rows out, checked against a plain-Python model of the semantics."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.engine.expressions import MissingColumnError
from sluice.engine.messages import Watermark
from sluice.engine.operators import OperatorContext
from sluice.engine.registry import build_operator
from sluice.engine.windows import (
    SlidingWindowOperator,
    TumblingWindowOperator,
    WindowOperator,
)

AGGREGATES = [
    {"fn": "count"},
    {"fn": "count", "column": "value", "as": "n_values"},
    {"fn": "sum", "column": "value"},
    {"fn": "min", "column": "value"},
    {"fn": "max", "column": "value"},
    {"fn": "mean", "column": "value"},
]

Record = tuple[Any, int, Any]  # key, event time (ms), value
Event = tuple[str, Any]  # ("batch", [records]) or ("wm", ts)


def make_window(size: int, slide: int | None = None, lateness: int = 0, aggregates: list[dict] | None = None,
                key: list[str] | None = None, time: str = "t") -> WindowOperator:
    params: dict[str, Any] = {
        "id": "w", "type": "tumbling_window" if slide is None else "sliding_window",
        "time": time, "size_ms": size, "allowed_lateness_ms": lateness,
        "aggregates": AGGREGATES if aggregates is None else aggregates, "key": key or ["k"],
    }
    if slide is not None:
        params["slide_ms"] = slide
    op = build_operator("w", params)
    assert isinstance(op, WindowOperator)
    op.open(OperatorContext("job", 1, "w", 0, 1), [])
    return op


def batch(records: list[Record]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array([r[0] for r in records], pa.string()), pa.array([r[1] for r in records], pa.int64()),
         pa.array([r[2] for r in records], pa.int64())],
        names=["k", "t", "value"],
    )


def rows(batches: list[pa.RecordBatch]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for b in batches:
        out.extend(b.to_pylist())
    return out


def ms(dt: datetime) -> int:
    return int(dt.replace(tzinfo=UTC).timestamp() * 1000)


def normalise(rs: list[dict[str, Any]]) -> list[tuple]:
    """Comparable rows: window bounds in ms, mean rounded."""
    out = []
    for r in rs:
        mean = r.get("mean_value")
        out.append((r["k"], ms(r["window_start"]), ms(r["window_end"]), r["count"], r["n_values"], r["sum_value"],
                    r["min_value"], r["max_value"], None if mean is None else round(mean, 9)))
    return sorted(out, key=repr)


def model(events: list[Event], size: int, slide: int, lateness: int) -> tuple[list[list[tuple]], int]:
    """The documented semantics, record by record: the rows each event emits (the last list is
    end of stream), and the number of late records."""
    wm: int | None = None
    windows: dict[tuple[Any, int], list[Any]] = defaultdict(list)
    emitted: set[tuple[Any, int]] = set()
    late = 0
    out: list[list[tuple]] = []

    def close(limit: float) -> list[tuple]:
        done = [w for w in windows if w not in emitted and w[1] + size + lateness <= limit]
        res = []
        for w in done:
            emitted.add(w)
            vals = [v for v in windows[w] if v is not None]
            res.append((w[0], w[1], w[1] + size, len(windows[w]), len(vals), sum(vals) if vals else None,
                        min(vals) if vals else None, max(vals) if vals else None,
                        round(sum(vals) / len(vals), 9) if vals else None))
        return sorted(res, key=repr)

    for kind, payload in events:
        if kind == "batch":
            for k, t, v in payload:
                first = t - t % slide - size + slide
                starts = range(first, t - t % slide + 1, slide)
                missed = False
                for s in starts:
                    if wm is not None and s + size + lateness <= wm:
                        missed = True
                    else:
                        windows[(k, s)].append(v)
                late += missed
            out.append([])
        else:
            if wm is None or payload > wm:
                wm = payload
                out.append(close(wm))
            else:
                out.append([])
    out.append(close(math.inf))
    return out, late


def run(op: WindowOperator, events: list[Event]) -> list[list[tuple]]:
    out = []
    for kind, payload in events:
        if kind == "batch":
            out.append(normalise(rows(op.process(batch(payload)))))
        else:
            out.append(normalise(rows(op.on_watermark(Watermark(payload)))))
    out.append(normalise(rows(op.on_end())))
    return out


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, int, list[Event]]:
    slide = draw(st.sampled_from([5, 10, 20]))
    size = slide * draw(st.sampled_from([1, 1, 2, 3]))
    lateness = draw(st.sampled_from([0, 0, 7, 30]))
    events: list[Event] = []
    clock = 0
    for _ in range(draw(st.integers(1, 8))):
        n = draw(st.integers(0, 25))
        records = [
            (draw(st.sampled_from(["a", "b", "c", None])),
             max(0, clock + draw(st.integers(-40, 40))),
             draw(st.one_of(st.none(), st.integers(-100, 100))))
            for _ in range(n)
        ]
        if records:
            events.append(("batch", records))
        clock += draw(st.integers(0, 40))
        if draw(st.booleans()):
            events.append(("wm", clock + draw(st.integers(-20, 0))))
    return size, slide, lateness, events


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_windows_match_the_model(scenario: tuple[int, int, int, list[Event]]) -> None:
    """Every emission (which rows, at which watermark) and the late count agree with the model,
    for tumbling (slide == size) and sliding windows, out-of-order input, lateness and nulls."""
    size, slide, lateness, events = scenario
    op = make_window(size, None if slide == size else slide, lateness)
    expected, late = model(events, size, slide, lateness)
    assert run(op, events) == expected
    assert op.late_records == late
    assert op.metrics() == {"late_records": float(late)}


def test_tumbling_counts_and_columns() -> None:
    op = make_window(10, aggregates=[{"fn": "count"}, {"fn": "sum", "column": "value", "as": "total"}])
    assert op.process(batch([("a", 1, 5), ("b", 2, 1), ("a", 9, 2), ("a", 10, 7)])) == []
    out = op.on_watermark(Watermark(10))
    assert out[0].schema.names == ["k", "window_start", "window_end", "count", "total"]
    assert out[0].schema.field("window_start").type == pa.timestamp("ms")
    got = sorted((r["k"], ms(r["window_start"]), ms(r["window_end"]), r["count"], r["total"]) for r in rows(out))
    assert got == [("a", 0, 10, 2, 7), ("b", 0, 10, 1, 1)]
    assert [(r["k"], r["count"]) for r in rows(op.on_end())] == [("a", 1)]


def test_out_of_order_within_the_bound_is_counted_in_its_window() -> None:
    op = make_window(10, aggregates=[{"fn": "count"}])
    op.process(batch([("a", 15, 1)]))
    op.on_watermark(Watermark(9))  # nothing closes yet: [0, 10) ends at 10
    op.process(batch([("a", 3, 1), ("a", 8, 1)]))  # older than the newest record, not late
    got = [(ms(r["window_start"]), r["count"]) for r in rows(op.on_watermark(Watermark(10)))]
    assert got == [(0, 2)]
    assert op.late_records == 0


def test_late_records_are_dropped_and_counted() -> None:
    op = make_window(10, aggregates=[{"fn": "count"}])
    op.process(batch([("a", 1, 1)]))
    assert [r["count"] for r in rows(op.on_watermark(Watermark(12)))] == [1]
    op.process(batch([("a", 5, 1), ("b", 9, 1), ("a", 12, 1)]))  # [0, 10) was emitted: two late
    assert op.late_records == 2
    assert op.metrics() == {"late_records": 2.0}
    assert [(r["k"], ms(r["window_start"]), r["count"]) for r in rows(op.on_end())] == [("a", 10, 1)]


def test_allowed_lateness_delays_emission_and_accepts_stragglers() -> None:
    op = make_window(10, lateness=5, aggregates=[{"fn": "count"}])
    op.process(batch([("a", 1, 1)]))
    assert op.on_watermark(Watermark(12)) == []  # 10 + 5 not reached
    op.process(batch([("a", 2, 1)]))  # behind the watermark, within the allowed lateness
    assert [r["count"] for r in rows(op.on_watermark(Watermark(15)))] == [2]
    op.process(batch([("a", 3, 1)]))
    assert op.late_records == 1


def test_end_of_stream_flushes_every_window_once() -> None:
    op = make_window(10, slide=5, aggregates=[{"fn": "count"}])
    op.process(batch([("a", 1, 1), ("a", 7, 1), ("b", 100, 1)]))
    got = sorted((r["k"], ms(r["window_start"]), r["count"]) for r in rows(op.on_end()))
    assert got == [("a", -5, 1), ("a", 0, 2), ("a", 5, 1), ("b", 95, 1), ("b", 100, 1)]
    assert op.on_end() == []
    assert op.pending_rows == 0


def test_sliding_window_late_for_some_windows_still_counts_in_the_open_ones() -> None:
    op = make_window(20, slide=10, aggregates=[{"fn": "count"}])
    op.process(batch([("a", 0, 1)]))
    assert sorted((ms(r["window_start"]), r["count"]) for r in rows(op.on_watermark(Watermark(20)))) == [
        (-10, 1), (0, 1)
    ]
    op.process(batch([("a", 15, 1), ("a", 12, 1)]))  # [0, 20) was emitted, [10, 30) is open
    assert op.late_records == 2
    op.process(batch([("a", 5, 1)]))  # all its windows ([-10, 10), [0, 20)) were emitted
    assert op.late_records == 3
    assert op.on_watermark(Watermark(25)) == []
    assert sorted((ms(r["window_start"]), r["count"]) for r in rows(op.on_end())) == [(10, 2)]


def test_older_watermarks_are_ignored() -> None:
    op = make_window(10, aggregates=[{"fn": "count"}])
    op.process(batch([("a", 1, 1)]))
    assert len(rows(op.on_watermark(Watermark(10)))) == 1
    assert op.on_watermark(Watermark(5)) == []
    op.process(batch([("a", 6, 1)]))
    assert op.late_records == 1


def test_timestamp_event_times_of_any_unit() -> None:
    for unit, scale in (("s", 1 / 1000), ("ms", 1), ("us", 1000), ("ns", 1_000_000)):
        op = make_window(2000, aggregates=[{"fn": "count"}], time="ts")
        b = pa.RecordBatch.from_arrays(
            [pa.array(["a", "a", "a"]),
             pa.array([int(v * scale) for v in (0, 1000, 2000)], pa.timestamp(unit, tz="UTC"))],
            names=["k", "ts"])
        op.process(b)
        got = sorted((ms(r["window_start"]), r["count"]) for r in rows(op.on_end()))
        assert got == [(0, 2), (2000, 1)], unit


def test_min_max_of_strings_and_timestamps_keep_their_type() -> None:
    op = make_window(10, aggregates=[{"fn": "min", "column": "name"}, {"fn": "max", "column": "at"},
                                     {"fn": "mean", "column": "x"}, {"fn": "sum", "column": "x"}])
    b = pa.RecordBatch.from_arrays(
        [pa.array(["a", "a", "b"]), pa.array([1, 2, 3], pa.int64()), pa.array(["q", "p", None]),
         pa.array([5, 7, 6], pa.timestamp("us")), pa.array([0.5, 1.5, None])],
        names=["k", "t", "name", "at", "x"])
    op.process(b)
    out = op.on_end()
    assert out[0].schema.field("min_name").type == pa.string()
    assert out[0].schema.field("max_at").type == pa.timestamp("us")
    assert out[0].schema.field("sum_x").type == pa.float64()
    got = sorted((r["k"], r["min_name"], r["max_at"].microsecond, r["mean_x"], r["sum_x"]) for r in rows(out))
    assert got == [("a", "p", 7, 1.0, 2.0), ("b", None, 6, None, None)]


def test_several_key_columns() -> None:
    op = make_window(10, aggregates=[{"fn": "count"}], key=["k", "j"])
    b = pa.RecordBatch.from_arrays(
        [pa.array(["a", "a", "a", "b"]), pa.array([1, 2, 1, 1]), pa.array([1, 2, 3, 4], pa.int64())],
        names=["k", "j", "t"])
    op.process(b)
    assert sorted((r["k"], r["j"], r["count"]) for r in rows(op.on_end())) == [("a", 1, 2), ("a", 2, 1), ("b", 1, 1)]


def test_null_event_time_is_an_error_naming_operator_and_column() -> None:
    op = make_window(10)
    with pytest.raises(ValueError, match=r"tumbling_window 'w'.*'t'.*null"):
        op.process(batch([("a", 1, 1), ("a", None, 1)]))  # type: ignore[list-item]


def test_columns_of_the_wrong_type_are_named() -> None:
    op = make_window(10, aggregates=[{"fn": "sum", "column": "name"}])
    b = pa.RecordBatch.from_arrays(
        [pa.array(["a"]), pa.array([1], pa.int64()), pa.array(["x"])], names=["k", "t", "name"]
    )
    with pytest.raises(
        TypeError, match=r"tumbling_window 'w': sum of column 'name' needs numbers, but the column is string"
    ):
        op.process(b)
    op = make_window(10, time="name")
    with pytest.raises(TypeError, match=r"event-time column 'name' is string; it must be a timestamp or integer"):
        op.process(b)


def test_missing_columns_are_named() -> None:
    op = make_window(10)
    b = pa.RecordBatch.from_arrays([pa.array(["a"]), pa.array([1])], names=["k", "value"])
    with pytest.raises(MissingColumnError, match=r"event-time column 't' is not in the input \(columns: k, value\)"):
        op.process(b)
    op = make_window(10, key=["user"])
    with pytest.raises(KeyError, match=r"key column 'user'"):
        op.process(batch([("a", 1, 1)]))


def test_params_with_compiler_key_and_aggregate_aliases() -> None:
    op = TumblingWindowOperator("w", {"id": "w", "type": "tumbling_window", "size_ms": 5, "time": "t",
                                      "key": ["k"], "parallelism": 2, "inputs": ["kb"],
                                      "aggregates": [{"fn": "sum", "column": "value", "as": "total"}]})
    op.open(OperatorContext("job", 1, "w", 0, 1), [])
    op.process(batch([("a", 1, 4)]))
    assert rows(op.on_end())[0]["total"] == 4
    with pytest.raises(ValueError, match="needs a key_by upstream"):
        SlidingWindowOperator("s", {"id": "s", "type": "sliding_window", "size_ms": 10, "slide_ms": 5})
    with pytest.raises(ValueError, match="collide"):
        make_window(10, aggregates=[{"fn": "count", "as": "k"}])


def test_many_batches_compact_without_changing_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction (forced often here) merges pending partials without changing any output."""
    from sluice.engine import windows

    monkeypatch.setattr(windows, "COMPACT_MIN_ROWS", 10)
    events: list[Event] = []
    for i in range(30):
        events.append(("batch", [(f"k{j % 7}", i * 3 + j % 5, j) for j in range(20)]))
        if i % 4 == 3:
            events.append(("wm", i * 3 - 10))
    for slide in (10, 5):
        op = make_window(10, None if slide == 10 else slide)
        assert run(op, events) == model(events, 10, slide, 0)[0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", None]), st.integers(0, 3),
                          st.one_of(st.none(), st.integers(-5, 5)),
                          st.one_of(st.none(), st.floats(-2, 2), st.just(float("nan")))), min_size=1, max_size=40))
def test_both_merge_methods_give_the_same_rows(data: list[tuple]) -> None:
    """Partials merge the same through numpy (dense group ids) and through Arrow's hash aggregation."""
    from sluice.engine.aggregates import Aggregates
    from sluice.models import AggregateSpec

    specs = [AggregateSpec(fn="count"), AggregateSpec(fn="sum", column="i"), AggregateSpec(fn="min", column="f"),
             AggregateSpec(fn="max", column="f"), AggregateSpec(fn="mean", column="i"),
             AggregateSpec(fn="max", column="i")]
    aggs = Aggregates("test", "t", specs)
    table = pa.table({"k": [r[0] for r in data], "p": pa.array([r[1] for r in data], pa.int64()),
                      "i": pa.array([r[2] for r in data], pa.int64()),
                      "f": pa.array([r[3] for r in data], pa.float64())})
    raw = pa.Table.from_arrays([table.column("k"), table.column("p"), *aggs.raw_partials(table)],
                               names=["k", "p", *aggs.part_names])

    def canonical(t: pa.Table) -> list[str]:
        return sorted(repr(r) for r in t.to_pylist())

    via_numpy, _ = aggs._merge_numpy(raw, ["k", "p"], {"p": 1}, {})
    assert canonical(via_numpy) == canonical(aggs._merge_acero(raw, ["k", "p"]))

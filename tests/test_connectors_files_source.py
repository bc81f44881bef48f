"""The files source reads jsonl/csv/parquet exactly once across subtasks, restores and rescales,
follows a directory, reports bad input precisely, and tracks event time; generator watermarks."""

from __future__ import annotations

import csv
import json
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sluice.connectors import connector_class, sink_class, source_class
from sluice.connectors.files import FilesSink
from sluice.connectors.files_source import FilesSource, InputError, owner_of
from sluice.connectors.generator import TS_BASE_MS, GeneratorSource, generator_rows
from sluice.engine.operators import OperatorContext
from sluice.engine.sources import Poll
from sluice.errors import UserError

BASE = datetime(2024, 1, 1)
SCHEMA = {"f": "string", "n": "int64", "ts": "timestamp", "x": "float64", "ok": "bool"}


def _rows(file: str, count: int, start_ms: int = 0) -> list[dict[str, Any]]:
    return [
        {"f": file, "n": i, "ts": BASE + timedelta(milliseconds=start_ms + i), "x": i / 4, "ok": i % 3 == 0}
        for i in range(count)
    ]


def _write(directory: Path, name: str, rows: list[dict[str, Any]], fmt: str, row_group_size: int = 4) -> None:
    """Write `rows` as `fmt`; timestamps as ISO text (jsonl) / epoch ms and ISO mixed (csv)."""
    path = directory / name
    if fmt == "jsonl":
        with open(path, "w") as f:
            for i, r in enumerate(rows):
                ts = r["ts"].isoformat(timespec="milliseconds") + "Z" if i % 2 else _ms(r["ts"])
                f.write(json.dumps({**r, "ts": ts}) + "\n")
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(rows[0]) if rows else list(SCHEMA))
            for i, r in enumerate(rows):
                ts = r["ts"].isoformat(timespec="milliseconds") if i % 2 else _ms(r["ts"])
                w.writerow([r["f"], r["n"], ts, r["x"], "true" if r["ok"] else "false"])
    else:
        table = pa.Table.from_pylist(rows, schema=pa.schema([
            ("f", pa.string()), ("n", pa.int32()), ("ts", pa.timestamp("us")), ("x", pa.float64()), ("ok", pa.bool_()),
        ]))
        pq.write_table(table, path, row_group_size=row_group_size)


def _ms(ts: datetime) -> int:
    return int((ts - datetime(1970, 1, 1)).total_seconds() * 1000)


def _params(path: Path, fmt: str = "jsonl", **extra: Any) -> dict[str, Any]:
    """As the compiler hands them over: the spec dumped by alias, plus id."""
    return {"id": "src", "type": "files", "role": "source", "path": str(path), "format": fmt,
            "schema": SCHEMA, "batch_size": 5, **extra}


def _source(params: dict[str, Any], index: int = 0, parallelism: int = 1,
            restored: list[pa.Table] | None = None) -> FilesSource:
    src = FilesSource("src", params)
    src.open(OperatorContext("job", 1, "src", index, parallelism), restored or [])
    return src


def _drain(src: FilesSource, limit: int | None = None) -> list[dict[str, Any]]:
    """Poll until finished (or `limit` batches); the rows emitted."""
    rows: list[dict[str, Any]] = []
    batches = 0
    while limit is None or batches < limit:
        p = src.poll(0.0)
        if p.finished:
            break
        assert p.batch is not None and 0 < p.batch.num_rows <= src.spec.batch_size
        rows.extend(p.batch.to_pylist())
        batches += 1
    return rows


def _key(r: dict[str, Any]) -> tuple[str, int]:
    return (r["f"], r["n"])


EXTENSIONS = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}


@pytest.fixture(params=["jsonl", "csv", "parquet"])
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


def _dataset(tmp_path: Path, fmt: str, files: int = 3, rows: int = 12) -> tuple[Path, list[dict[str, Any]]]:
    directory = tmp_path / "in"
    directory.mkdir()
    expected: list[dict[str, Any]] = []
    for i in range(files):
        name = f"part-{i:02d}.{fmt}"
        data = _rows(name, rows + i)
        _write(directory, name, data, fmt)
        expected.extend(data)
    (directory / ".hidden.tmp").write_text("not input\n")
    (directory / "_SUCCESS").write_text("")
    return directory, expected


# ---------------------------------------------------------------- reading


def test_reads_every_format_exactly(tmp_path: Path, fmt: str) -> None:
    directory, expected = _dataset(tmp_path, fmt)
    src = _source(_params(directory, fmt))
    assert src.output_schema() == pa.schema([("f", pa.string()), ("n", pa.int64()), ("ts", pa.timestamp("ms")),
                                             ("x", pa.float64()), ("ok", pa.bool_())])
    rows = _drain(src)
    assert rows == expected  # files in name order, rows in file order, values exact
    assert src.poll(0.0).finished
    state = src.snapshot(1).table
    assert state is not None and state.to_pylist() == [
        {"file": f"part-{i:02d}.{fmt}", "offset": 12 + i, "done": True} for i in range(3)
    ]
    src.close()


def test_inferred_types_without_schema(tmp_path: Path) -> None:
    # the second block alone would be inferred as null / double: it keeps the types seen first
    (tmp_path / "a.jsonl").write_text('{"k": "a", "v": 1}\n{"k": "b", "v": null}\n{"k": "c", "v": null}\n')
    (tmp_path / "b.jsonl").write_text('{"k": "d", "v": 4.0}\n')
    src = _source({"id": "src", "type": "files", "role": "source", "path": str(tmp_path), "batch_size": 2})
    batches = []
    while not (p := src.poll(0.0)).finished:
        assert p.batch is not None
        batches.append(p.batch)
    assert [b.to_pylist() for b in batches] == [[{"k": "a", "v": 1}, {"k": "b", "v": None}], [{"k": "c", "v": None}],
                                                [{"k": "d", "v": 4}]]
    assert all(b.schema == pa.schema([("k", pa.string()), ("v", pa.int64())]) for b in batches)


def test_empty_files_and_empty_directory(tmp_path: Path, fmt: str) -> None:
    (tmp_path / f"a.{fmt}").write_text("")
    if fmt == "parquet":
        pq.write_table(pa.table({"f": pa.array([], pa.string()), "n": pa.array([], pa.int64()),
                                 "ts": pa.array([], pa.timestamp("ms")), "x": pa.array([], pa.float64()),
                                 "ok": pa.array([], pa.bool_())}), tmp_path / f"a.{fmt}")
    src = _source(_params(tmp_path, fmt))
    assert _drain(src) == []
    assert src.snapshot(1).table.to_pylist() == [{"file": f"a.{fmt}", "offset": 0, "done": True}]  # type: ignore[union-attr]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _source(_params(empty, fmt)).poll(0.0).finished


def test_missing_directory_is_a_clear_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=re.escape(f"directory {str(missing)!r} does not exist")):
        _source(_params(missing))


# ---------------------------------------------------------------- splits, state, rescale


def test_files_spread_over_subtasks_by_name_and_none_read_twice(tmp_path: Path, fmt: str) -> None:
    directory, expected = _dataset(tmp_path, fmt, files=12, rows=3)
    got: list[dict[str, Any]] = []
    files_per_subtask: list[set[str]] = []
    for index in range(3):
        rows = _drain(_source(_params(directory, fmt), index, 3))
        files = {r["f"] for r in rows}
        assert all(owner_of(f, 3) == index for f in files)
        files_per_subtask.append(files)
        got.extend(rows)
    assert sorted(got, key=_key) == sorted(expected, key=_key)  # each row exactly once
    assert sum(1 for files in files_per_subtask if files) >= 2  # actually spread
    assert set().union(*files_per_subtask) == {f"part-{i:02d}.{fmt}" for i in range(12)}


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 1)])
def test_snapshot_then_restore_with_other_parallelism(tmp_path: Path, fmt: str, before: int, after: int) -> None:
    directory, expected = _dataset(tmp_path, fmt, files=7, rows=9)
    checkpointed: list[dict[str, Any]] = []  # emitted before the barrier: part of the checkpoint
    tables: list[pa.Table] = []
    for index in range(before):
        src = _source(_params(directory, fmt), index, before)
        checkpointed.extend(_drain(src, limit=3 + index))  # stop part-way through some file
        state = src.snapshot(5).table
        assert state is not None
        tables.append(state)
        _drain(src, limit=2)  # emitted after the barrier, then the job failed: to be replayed
        src.close()
    assert any(off > 0 and not done for t in tables
               for off, done in zip(t.column("offset").to_pylist(), t.column("done").to_pylist()))
    resumed: list[dict[str, Any]] = []
    for index in range(after):
        resumed.extend(_drain(_source(_params(directory, fmt), index, after, restored=tables)))
    assert len(checkpointed + resumed) == len(expected)
    assert sorted(checkpointed + resumed, key=_key) == sorted(expected, key=_key)


def test_restore_keeps_only_owned_files_and_skips_done_ones(tmp_path: Path) -> None:
    directory, _ = _dataset(tmp_path, "jsonl", files=4, rows=6)
    names = [f"part-{i:02d}.jsonl" for i in range(4)]
    state = pa.table({"file": names, "offset": [6, 2, 0, 9], "done": [True, False, False, True]},
                     schema=pa.schema([("file", pa.string()), ("offset", pa.int64()), ("done", pa.bool_())]))
    rows = [r for i in range(2) for r in _drain(_source(_params(directory), i, 2, restored=[state]))]
    assert sorted(map(_key, rows)) == sorted(
        [("part-01.jsonl", n) for n in range(2, 7)] + [("part-02.jsonl", n) for n in range(8)]
    )
    inconsistent = pa.table({"file": ["part-01.jsonl"], "offset": [3], "done": [False]}, schema=state.schema)
    with pytest.raises(ValueError, match="restored twice"):
        _source(_params(directory), 0, 1, restored=[state, inconsistent])


def test_follow_picks_up_new_files(tmp_path: Path) -> None:
    _write(tmp_path, "a.jsonl", _rows("a.jsonl", 3), "jsonl")
    src = _source(_params(tmp_path, follow=True, poll_interval_s=2.0))
    assert [r["n"] for r in _drain_at(src, 10.0)] == [0, 1, 2]
    idle = src.poll(10.0)
    assert idle.batch is None and not idle.finished and 0 < idle.idle_s <= 2.0
    _write(tmp_path, "b.jsonl", _rows("b.jsonl", 4), "jsonl")
    (tmp_path / ".b2.jsonl").write_text('{"not": "yet"}\n')  # being written: invisible
    assert src.poll(11.0).idle_s == pytest.approx(1.0)  # not listed again before the interval
    assert [(r["f"], r["n"]) for r in _drain_at(src, 12.5)] == [("b.jsonl", n) for n in range(4)]
    assert not src.poll(12.5).finished
    assert {r["file"]: r["done"] for r in src.snapshot(1).table.to_pylist()} == {"a.jsonl": True, "b.jsonl": True}  # type: ignore[union-attr]


def _drain_at(src: FilesSource, now: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while (p := src.poll(now)).batch is not None:
        rows.extend(p.batch.to_pylist())
    assert not p.finished
    return rows


# ---------------------------------------------------------------- bad input


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        '{"f": "a", "n": 1, "ts": 1, "x": 1.0, "ok": true}\n\n{"ts": oops}\n'
    )
    src = _source(_params(tmp_path))
    with pytest.raises(InputError) as info:
        _drain(src)
    path = str(tmp_path / "a.jsonl")
    assert str(info.value) == f"file {path!r} line 3: cannot parse '{{\"ts\": oops}}' as JSON"
    assert isinstance(info.value, UserError) and info.value.retryable is False


@pytest.mark.parametrize(("fmt", "content", "message"), [
    ("csv", "f,n,ts,x,ok\n" + "a,1,0,1.0,true\n" * 5 + "a,abc,0,1.0,true\n",
     "row 7 column 'n': 'abc' is not an int64"),
    ("jsonl", '{"f": "a", "n": 1, "ts": 0, "x": 1, "ok": true}\n{"f": "a", "n": 2, "ts": 0, "x": "1,5", "ok": true}\n',
     "line 2 column 'x': '1,5' is not a float64"),
    ("jsonl", '{"f": 7, "n": 1, "ts": 0, "x": 1, "ok": true}\n',
     "line 1 column 'f': 7 is not a string"),
    ("jsonl", '{"f": "a", "n": 1, "ts": "yesterday", "x": 1, "ok": true}\n',
     "line 1 column 'ts': 'yesterday' is not a timestamp"),
    ("jsonl", '{"f": "a", "n": 1, "ts": 0, "x": 1, "ok": true}\n{"f": "a", "n": 1, "ts": 0, "x": 1}\n',
     "line 2: missing column 'ok'"),
    ("csv", "f,n,ts,x\na,1,0,1.0\n", "row 1: missing column 'ok' in the header (f, n, ts, x)"),
    ("csv", "f,n,ts,x,ok\na,1,0,1.0,true\na,2,0\n", "row 3: expected 5 columns, got 3: 'a,2,0'"),
])
def test_bad_values_name_file_row_column_and_value(tmp_path: Path, fmt: str, content: str, message: str) -> None:
    (tmp_path / f"bad.{fmt}").write_text(content)
    with pytest.raises(InputError) as info:
        _drain(_source(_params(tmp_path, fmt, batch_size=100)))
    assert str(info.value).startswith(f"file {str(tmp_path / f'bad.{fmt}')!r} {message}")


def test_parquet_missing_column_and_garbage(tmp_path: Path) -> None:
    pq.write_table(pa.table({"f": ["a"]}), tmp_path / "a.parquet")
    with pytest.raises(InputError, match=r"a\.parquet': missing column 'n'"):
        _drain(_source(_params(tmp_path, "parquet")))
    (tmp_path / "a.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        _drain(_source(_params(tmp_path, "parquet")))


def test_event_time_must_be_a_declared_timestamp(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="must be a timestamp"):
        FilesSource("src", _params(tmp_path, event_time="n"))
    with pytest.raises(UserError, match="not in its schema"):
        FilesSource("src", _params(tmp_path, event_time="when"))


# ---------------------------------------------------------------- event time


def _ts_rows(name: str, offsets_ms: list[int]) -> list[dict[str, Any]]:
    return [{"f": name, "n": i, "ts": BASE + timedelta(milliseconds=o), "x": 0.0, "ok": True}
            for i, o in enumerate(offsets_ms)]


def test_watermarks_from_event_time_with_out_of_order_data(tmp_path: Path) -> None:
    base = _ms(BASE)
    _write(tmp_path, "a.jsonl", _ts_rows("a.jsonl", [10, 5, 30, 20, 8, 25, 40, 35]), "jsonl")
    src = _source(_params(tmp_path, event_time="ts", out_of_orderness_ms=7, batch_size=2))
    marks: list[int | None] = []
    rows = 0
    while (batch := src.poll(0.0).batch) is not None:
        rows += batch.num_rows
        marks.append(src.watermark())
    # batch highs 10, 30, 25 (the file's high stays 30: no advance), 40 -> minus 7; a late row (8)
    # is still emitted; the file finishing ends its tracking
    assert rows == 8
    assert marks == [base + 3, base + 23, None, base + 33]
    assert src.watermark() is None


def test_unstarted_file_holds_watermark_back_and_finished_one_does_not(tmp_path: Path) -> None:
    base = _ms(BASE)
    for name, offsets in [("a.csv", [100, 200, 300]), ("b.csv", [50, 60])]:
        _write(tmp_path, name, _ts_rows(name, offsets), "csv")
    src = _source(_params(tmp_path, "csv", event_time="ts", batch_size=2))
    assert src.poll(0.0).batch is not None and src.watermark() is None  # a at 200, b not started
    assert src.poll(0.0).batch is not None and src.watermark() is None  # a at 300
    assert src.poll(0.0).batch is not None  # a done; b's rows
    assert src.watermark() == base + 60
    assert src.poll(0.0).finished


def test_no_event_time_no_watermark(tmp_path: Path) -> None:
    _write(tmp_path, "a.jsonl", _rows("a.jsonl", 3), "jsonl")
    src = _source(_params(tmp_path))
    assert src.poll(0.0).batch is not None and src.watermark() is None


def test_generator_watermarks_track_splits_and_keep_output(tmp_path: Path) -> None:
    params = {"id": "gen", "type": "generator", "splits": 2, "limit": 10, "batch_size": 4, "out_of_orderness_ms": 1}
    src = GeneratorSource("gen", params)
    src.open(OperatorContext("job", 1, "gen", 0, 1), [])
    seen: list[tuple[int, int, int | None]] = []
    batches: list[pa.RecordBatch] = []
    while (p := src.poll(0.0)).batch is not None:
        split = p.batch.column("split")[0].as_py()
        batches.append(p.batch)
        seen.append((split, p.batch.column("seq")[-1].as_py(), src.watermark()))
    # split 0 then 1 alternate; a watermark needs both splits to have emitted; finished splits drop out
    assert seen == [(0, 3, None), (1, 3, TS_BASE_MS + 2), (0, 7, None), (1, 7, TS_BASE_MS + 6),
                    (0, 9, None), (1, 9, None)]
    assert src.watermark() is None
    for split in (0, 1):
        got = pa.Table.from_batches([b for b in batches if b.column("split")[0].as_py() == split])
        assert got.equals(pa.Table.from_batches([generator_rows(params, split, 0, 10)]))


# ---------------------------------------------------------------- registry


def test_registry_resolves_files_by_role() -> None:
    assert source_class({"type": "files", "role": "source", "path": "x"}) is FilesSource
    assert sink_class({"type": "files", "role": "source", "path": "x"}) is None
    assert sink_class({"type": "files", "path": "x"}) is FilesSink
    assert sink_class({"type": "files", "role": "sink"}) is FilesSink
    assert source_class({"type": "files", "path": "x"}) is None
    assert source_class("files", "source") is FilesSource and source_class("files") is None
    assert sink_class("files") is FilesSink
    assert source_class({"type": "generator"}) is GeneratorSource and sink_class("generator") is None
    assert source_class("map") is None and sink_class({"type": "map"}) is None
    assert connector_class({"type": "files", "role": "source"}) is FilesSource
    assert connector_class({"type": "files"}) is FilesSink and connector_class({"type": "filter"}) is None


def test_poll_result_is_well_formed(tmp_path: Path) -> None:
    _write(tmp_path, "a.jsonl", _rows("a.jsonl", 2), "jsonl")
    p = _source(_params(tmp_path)).poll(0.0)
    assert isinstance(p, Poll) and p.batch is not None and not p.finished and p.idle_s == 0

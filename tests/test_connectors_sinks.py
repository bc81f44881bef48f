"""Sinks: the files sink's Parquet format (2PC, idempotent commit/recover, readable output), the
jsonl format through the shared code path, stdout and null."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sluice.connectors import sink_class
from sluice.connectors.files import FilesSink, committed_files
from sluice.connectors.null import NullSink
from sluice.connectors.stdout import StdoutSink
from sluice.engine.operators import OperatorContext
from sluice.models import CheckpointManifest, FilesSinkOperator, OperatorCheckpoint


def _params(path: Path, fmt: str = "parquet") -> dict[str, Any]:
    """As the compiler hands them over: the spec dumped by alias, plus id."""
    spec = FilesSinkOperator(id="out", type="files", path=str(path), format=fmt)  # type: ignore[arg-type]
    return spec.model_dump(by_alias=True, mode="json")


def _sink(params: dict[str, Any], index: int = 0, generation: int = 1) -> FilesSink:
    s = FilesSink("out", params)
    s.open(OperatorContext("job", generation, "out", index, 2), [])
    return s


def _batch(values: list[int], label: str = "x") -> pa.RecordBatch:
    return pa.record_batch({
        "v": pa.array(values, pa.int64()),
        "s": pa.array([f"{label}{v}" for v in values]),
        "ts": pa.array([1_704_067_200_000 + v for v in values], pa.timestamp("ms")),
    })


def _read_parquet(path: Path) -> pa.Table:
    files = committed_files(str(path))
    assert all(f.endswith(".parquet") for f in files)
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def test_parquet_stage_commit_idempotent_and_readable(tmp_path: Path) -> None:
    params = _params(tmp_path)
    s = _sink(params)
    assert s.snapshot(1).commits == []  # an empty epoch stages nothing
    s.process(_batch([1, 2]))
    s.process(_batch([3]))
    commits = s.snapshot(2).commits
    assert [c["staged"] for c in commits] == [str(tmp_path / ".staging/epoch-0000000002-sub-0000-gen-1.parquet")]
    final = Path(commits[0]["final"])
    assert final.parent == tmp_path and re.fullmatch(r"part-0000000002-0000-[0-9a-f]{8}\.parquet", final.name)
    assert committed_files(str(tmp_path)) == []  # staged, not visible
    assert pq.read_table(commits[0]["staged"]).num_rows == 3  # sealed: complete file with footer
    assert FilesSink.commit(params, commits) == 1
    assert FilesSink.commit(params, commits) == 1  # again: already published
    table = pq.read_table(final)
    assert table.schema == _batch([1]).schema
    assert table.to_pylist() == pa.Table.from_batches([_batch([1, 2, 3])]).to_pylist()
    s.process(_batch([4]))
    FilesSink.commit(params, s.snapshot(3).commits)
    assert sorted(_read_parquet(tmp_path).column("v").to_pylist()) == [1, 2, 3, 4]
    s.close()


def test_parquet_recover_publishes_manifest_and_discards_rest(tmp_path: Path) -> None:
    params = _params(tmp_path)
    s = _sink(params)
    s.process(_batch([1]))
    kept = s.snapshot(3).commits
    s.process(_batch([2]))
    s.snapshot(4)  # epoch 4 never got a manifest
    s.process(_batch([3]))  # in progress when the runner died
    s.close()
    manifest = CheckpointManifest(job_id="job", epoch=3, generation=1, created_at=datetime.now(UTC),
                                  operators={"out": OperatorCheckpoint(parallelism=1, commits=kept)})
    FilesSink.recover(params, manifest)
    FilesSink.recover(params, manifest)  # idempotent
    assert _read_parquet(tmp_path).column("v").to_pylist() == [1]
    assert list((tmp_path / ".staging").iterdir()) == []
    FilesSink.recover(params, None)  # a fresh start over published output leaves it alone
    assert _read_parquet(tmp_path).column("v").to_pylist() == [1]


def test_parquet_casts_later_batches_to_the_files_schema(tmp_path: Path) -> None:
    params = _params(tmp_path)
    s = _sink(params, index=1)
    s.process(pa.record_batch({"a": pa.array([1.5]), "b": pa.array(["x"])}))
    s.process(pa.record_batch({"b": pa.array([None], pa.null()), "a": pa.array([2], pa.int64())}))
    commits = s.snapshot(1).commits
    FilesSink.commit(params, commits)
    assert Path(commits[0]["final"]).name.startswith("part-0000000001-0001-")
    assert pq.read_table(commits[0]["final"]).to_pylist() == [
        {"a": 1.5, "b": "x"}, {"a": 2.0, "b": None}]
    s.process(pa.record_batch({"a": pa.array([1.5])}))
    with pytest.raises(ValueError, match="one file holds one schema"):
        s.process(pa.record_batch({"c": pa.array([1])}))
    s.close()


def test_parquet_large_epoch_spans_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sluice.connectors import files

    monkeypatch.setattr(files, "PARQUET_ROW_GROUP_ROWS", 10)
    params = _params(tmp_path)
    s = _sink(params)
    for start in range(0, 35, 7):
        s.process(_batch(list(range(start, start + 7))))
    commits = s.snapshot(1).commits
    FilesSink.commit(params, commits)
    f = pq.ParquetFile(commits[0]["final"])
    assert f.metadata.num_row_groups > 1
    assert f.read().column("v").to_pylist() == list(range(35))


def test_jsonl_still_the_default_through_the_shared_path(tmp_path: Path) -> None:
    params = _params(tmp_path, "jsonl")
    s = _sink(params)
    s.process(_batch([1]))
    commits = s.snapshot(7).commits
    assert re.fullmatch(r"part-0000000007-0000-[0-9a-f]{8}\.jsonl", Path(commits[0]["final"]).name)
    FilesSink.commit(params, commits)
    assert [json.loads(line) for line in Path(commits[0]["final"]).read_text().splitlines()] == [
        {"v": 1, "s": "x1", "ts": "2024-01-01T00:00:00.001Z"}]
    s.close()


def test_files_sink_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        FilesSink("out", {"id": "out", "type": "files", "path": str(tmp_path), "format": "csv"})


def test_stdout_sink_prints_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    sink = StdoutSink("print", {"id": "print", "type": "stdout"})
    sink.open(OperatorContext("job", 1, "print", 0, 1), [])
    assert sink.process(_batch([1, 2])) == []
    sink.process(_batch([]))
    sink.process(pa.record_batch({"q": pa.array(['say "hi"\n'])}))
    out = capsys.readouterr().out
    assert [json.loads(line) for line in out.splitlines()] == [
        {"v": 1, "s": "x1", "ts": "2024-01-01T00:00:00.001Z"},
        {"v": 2, "s": "x2", "ts": "2024-01-01T00:00:00.002Z"},
        {"q": 'say "hi"\n'},
    ]
    assert StdoutSink.commit({"id": "print"}, []) == 0


def test_null_sink_discards_and_counts() -> None:
    sink = NullSink("drop", {"id": "drop", "type": "null"})
    sink.open(OperatorContext("job", 1, "drop", 0, 1), [])
    assert sink.process(_batch([1, 2, 3])) == [] and sink.process(_batch([4])) == []
    assert sink.rows == 4
    assert sink.snapshot(1).table is None and sink.snapshot(1).commits == []
    NullSink.recover({"id": "drop"}, None)


def test_sink_lookup_by_params() -> None:
    assert sink_class({"type": "stdout", "id": "p"}) is StdoutSink
    assert sink_class({"type": "null", "id": "n"}) is NullSink
    assert sink_class(_params(Path("/tmp/x"))) is FilesSink
    assert sink_class("null", "source") is None

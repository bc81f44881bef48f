"""Files sink two-phase commit: idempotent commit, recover publishes the manifest and discards the rest."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from sluice.connectors import sink_class
from sluice.connectors.files import FilesSink
from sluice.engine.operators import OperatorContext
from sluice.models import CheckpointManifest, OperatorCheckpoint
from tests.engine_helpers import read_committed


def _sink(path: Path, index: int = 0, generation: int = 1) -> FilesSink:
    s = FilesSink("out", {"id": "out", "type": "files", "path": str(path)})
    s.open(OperatorContext("job", generation, "out", index, 2), [])
    return s


def test_sink_class_lookup() -> None:
    assert sink_class("files") is FilesSink
    assert sink_class("map") is None and sink_class("generator") is None


def test_stage_commit_idempotent(tmp_path: Path) -> None:
    params = {"id": "out", "type": "files", "path": str(tmp_path)}
    s = _sink(tmp_path)
    assert s.snapshot(1).commits == []  # empty epoch stages nothing
    s.process(pa.record_batch({"a": [1, 2]}))
    commits = s.snapshot(2).commits
    assert [c["staged"] for c in commits] == [str(tmp_path / ".staging/epoch-0000000002-sub-0000-gen-1.jsonl")]
    final = Path(commits[0]["final"])  # epoch, subtask and the subtask instance's token
    assert final.parent == tmp_path and re.fullmatch(r"part-0000000002-0000-[0-9a-f]{8}\.jsonl", final.name)
    assert read_committed(tmp_path) == []  # staged, not visible
    assert FilesSink.commit(params, commits) == 1
    assert FilesSink.commit(params, commits) == 1  # again: already done
    assert read_committed(tmp_path) == [{"a": 1}, {"a": 2}]
    s.close()


def test_commit_of_lost_output_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FilesSink.commit({"id": "out", "path": str(tmp_path)},
                         [{"staged": str(tmp_path / ".staging/x"), "final": str(tmp_path / "part-x")}])


def test_recover_publishes_manifest_and_discards_rest(tmp_path: Path) -> None:
    params = {"id": "out", "type": "files", "path": str(tmp_path)}
    s = _sink(tmp_path)
    s.process(pa.record_batch({"a": [1]}))
    kept = s.snapshot(3).commits
    s.process(pa.record_batch({"a": [2]}))
    s.snapshot(4)  # epoch 4 never got a manifest
    s.process(pa.record_batch({"a": [3]}))  # in progress when the runner died
    s.close()
    manifest = CheckpointManifest(job_id="job", epoch=3, generation=1, created_at=datetime.now(UTC),
                                  operators={"out": OperatorCheckpoint(parallelism=1, commits=kept)})
    FilesSink.recover(params, manifest)
    FilesSink.recover(params, manifest)  # idempotent
    assert read_committed(tmp_path) == [{"a": 1}]
    assert list((tmp_path / ".staging").iterdir()) == []


def test_jsonl_encoding_of_types(tmp_path: Path) -> None:
    s = _sink(tmp_path)
    s.process(pa.record_batch({
        "i": pa.array([1, None]), "f": pa.array([1.5, float("nan")]), "s": pa.array(['a"b\n', "é"]),
        "b": pa.array([True, None]), "t": pa.array([0, 1500], pa.timestamp("ms")),
        "l": pa.array([[1, 2], None]),
    }))
    FilesSink.commit({"id": "out", "path": str(tmp_path)}, s.snapshot(1).commits)
    assert read_committed(tmp_path) == [
        {"i": 1, "f": 1.5, "s": 'a"b\n', "b": True, "t": "1970-01-01T00:00:00.000Z", "l": [1, 2]},
        {"i": None, "f": None, "s": "é", "b": None, "t": "1970-01-01T00:00:01.500Z", "l": None},
    ]

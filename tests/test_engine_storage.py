"""Checkpoint store: state round trip, manifest atomicity and epoch listing."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from sluice.models import CheckpointManifest, OperatorCheckpoint
from sluice.storage import CheckpointStore


def _manifest(epoch: int, job: str = "job1") -> CheckpointManifest:
    return CheckpointManifest(
        job_id=job, epoch=epoch, generation=1, created_at=datetime.now(UTC),
        operators={"gen": OperatorCheckpoint(parallelism=1, state_files=[f"x-{epoch}"])},
    )


def test_state_round_trip_and_layout(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), "job1")
    table = pa.table({"split": [0, 1], "offset": [5, 6]})
    rel = store.write_state(3, "gen", 1, table)
    assert rel == "checkpoints/epoch-0000000003/gen-1.arrow"
    assert (tmp_path / "job1" / rel).is_file()
    assert store.read_state(rel).equals(table)
    # a store opened through a file:// URI reads the same files
    assert CheckpointStore(f"file://{tmp_path}", "job1").read_state(rel).equals(table)


def test_no_manifest_means_no_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), "job1")
    assert store.completed_epochs() == [] and store.latest_manifest() is None
    assert store.highest_epoch_seen() == 0
    store.write_state(1, "gen", 0, pa.table({"a": [1]}))
    store.write_manifest(_manifest(1))
    store.write_state(2, "gen", 0, pa.table({"a": [2]}))  # epoch 2 never got its manifest
    assert store.completed_epochs() == [1]
    assert store.latest_manifest().epoch == 1  # type: ignore[union-attr]
    assert store.read_manifest(2) is None
    assert store.highest_epoch_seen() == 2


def test_manifest_write_leaves_no_temp_files(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), "job1")
    path = store.write_manifest(_manifest(4))
    assert path.endswith("epoch-0000000004/manifest.json")
    assert os.listdir(tmp_path / "job1/checkpoints/epoch-0000000004") == ["manifest.json"]
    assert store.read_manifest(4) == _manifest(4).model_copy(update={"created_at": store.read_manifest(4).created_at})  # type: ignore[union-attr]


def test_temp_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), "job1")
    d = tmp_path / "job1/checkpoints/epoch-0000000007"
    d.mkdir(parents=True)
    (d / ".manifest.json.abc.tmp").write_text("{half")  # a writer crashed mid-write
    assert store.completed_epochs() == [] and store.latest_manifest() is None
    assert store.highest_epoch_seen() == 7


def test_latest_and_delete(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path), "job1")
    for e in (1, 2, 10):
        store.write_manifest(_manifest(e))
    assert store.completed_epochs() == [1, 2, 10]
    assert store.latest_manifest().epoch == 10  # type: ignore[union-attr]
    store.delete_epochs([10, 2, 99])
    assert store.completed_epochs() == [1]
    assert store.latest_manifest().epoch == 1  # type: ignore[union-attr]


def test_manifest_of_other_job_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CheckpointStore(str(tmp_path), "job1").write_manifest(_manifest(1, job="other"))

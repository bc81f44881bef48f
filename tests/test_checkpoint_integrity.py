"""Checkpoint integrity: digests recorded while state files are written, verification before a
restore, and the errors a corrupt checkpoint produces (store, runner side, controller side).

Every corruption here is done to real files on disk, the way a full disk, a crash of the storage
layer or a careless hand would: truncation, a flipped byte, a deleted file, a half-written manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pytest
from temporalio.exceptions import ApplicationError

from sluice.activities.compiling import CompileActivities
from sluice.activities.context import ControllerContext
from sluice.activities.restoring import corrupt_checkpoint_error, restore_point
from sluice.engine.compiler import compile_program
from sluice.engine.task import SubtaskRunner, TaskError
from sluice.errors import CorruptCheckpointError
from sluice.models import (
    CheckpointManifest,
    CompileInput,
    JobConfig,
    JobSpec,
    OperatorSnapshot,
    PipelineSpec,
    SubtaskRef,
    SubtaskSnapshot,
)
from sluice.schedulers.process import ProcessScheduler
from sluice.storage import (
    CheckpointProblem,
    CheckpointStore,
    manifest_from_snapshots,
    report_checkpoints,
    verify_checkpoint,
    verifying_epochs,
)
from sluice.workflows.constants import CORRUPT_CHECKPOINT_TYPE

JOB = "job1"


def _pipeline(out: Path) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "integrity", "parallelism": 2,
        "operators": [
            {"id": "gen", "type": "generator", "splits": 4, "keys": 5, "limit": 100},
            {"id": "out", "type": "files", "path": str(out)},
        ],
    })


def _state(epoch: int, subtask: int) -> pa.Table:
    rows = 1000 + subtask
    return pa.table({"split": list(range(rows)), "offset": [epoch * 10 + subtask] * rows})


def _checkpoint(store: CheckpointStore, tmp_path: Path, epoch: int) -> CheckpointManifest:
    """Write a whole checkpoint of `epoch` the way runners and the controller do: every subtask's
    state file (digest computed while writing), its snapshot, then the manifest."""
    program = compile_program(_pipeline(tmp_path / "out"), JobConfig())
    snapshots = []
    for ref in program.subtasks():
        ops = {}
        for op_id in program.chains[ref.chain].operators:
            if op_id == "gen":
                path, digest = store.write_state_file(epoch, op_id, ref.index, _state(epoch, ref.index))
                ops[op_id] = OperatorSnapshot(state_files=[path], state_digests={path: digest})
            else:
                ops[op_id] = OperatorSnapshot()
        snapshots.append(SubtaskSnapshot(subtask=ref, epoch=epoch, operators=ops))
    manifest = manifest_from_snapshots(job_id=JOB, epoch=epoch, generation=1, program=program, snapshots=snapshots)
    store.write_manifest(manifest)
    return manifest


def _state_file(store: CheckpointStore, manifest: CheckpointManifest, index: int = 0) -> Path:
    return Path(store.state_file_path(manifest.operators["gen"].state_files[index]))


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(str(tmp_path / "ckpt"), JOB)


# ------------------------------------------------------------------------------ digests


def test_digest_is_the_written_files_size_and_sha256(store: CheckpointStore) -> None:
    table = _state(3, 1)
    path, digest = store.write_state_file(3, "gen", 1, table)
    data = Path(store.state_file_path(path)).read_bytes()
    assert digest.size == len(data) > 0
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert store.read_state(path, digest, check_sha256=True).equals(table)
    assert store.write_state(3, "gen", 1, table) == path  # the plain write still returns the path


def test_manifest_records_every_state_files_digest(store: CheckpointStore, tmp_path: Path) -> None:
    manifest = _checkpoint(store, tmp_path, 1)
    gen = store.read_manifest(1).operators["gen"]  # type: ignore[union-attr]
    assert len(gen.state_files) == 2 and set(gen.state_digests) == set(gen.state_files)
    for path in gen.state_files:
        data = Path(store.state_file_path(path)).read_bytes()
        assert gen.state_digests[path].size == len(data)
        assert gen.state_digests[path].sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.operators["gen"].state_digests == gen.state_digests


# ------------------------------------------------------------------------------ verification


def test_intact_checkpoint_verifies(store: CheckpointStore, tmp_path: Path) -> None:
    _checkpoint(store, tmp_path, 1)
    assert verify_checkpoint(store, 1) == []
    assert restore_point(store, 1).epoch == 1


def test_truncated_state_file_is_found(store: CheckpointStore, tmp_path: Path) -> None:
    manifest = _checkpoint(store, tmp_path, 1)
    f = _state_file(store, manifest, 1)
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[: size // 2])
    (problem,) = verify_checkpoint(store, 1)
    assert problem.epoch == 1 and problem.file == str(f) and problem.what == "state file"
    assert f"size {size // 2} bytes, expected {size}" in problem.problem


def test_flipped_byte_is_found(store: CheckpointStore, tmp_path: Path) -> None:
    manifest = _checkpoint(store, tmp_path, 1)
    f = _state_file(store, manifest, 0)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, still a readable Arrow file: only the digest knows
    f.write_bytes(bytes(data))
    (problem,) = verify_checkpoint(store, 1)
    assert problem.file == str(f) and "sha256 mismatch" in problem.problem


def test_missing_state_file_is_found(store: CheckpointStore, tmp_path: Path) -> None:
    manifest = _checkpoint(store, tmp_path, 1)
    f = _state_file(store, manifest, 0)
    f.unlink()
    (problem,) = verify_checkpoint(store, 1)
    assert problem.file == str(f) and problem.problem == "missing"


def test_truncated_manifest_is_found(store: CheckpointStore, tmp_path: Path) -> None:
    _checkpoint(store, tmp_path, 1)
    m = Path(store.manifest_path(1))
    m.write_bytes(m.read_bytes()[:100])
    assert store.completed_epochs() == [1]  # still counted as a checkpoint: never skipped silently
    (problem,) = verify_checkpoint(store, 1)
    assert problem.what == "manifest" and problem.file == str(m)
    assert "not a valid manifest" in problem.problem and "Invalid JSON" in problem.problem
    report = report_checkpoints(store)
    assert [(r.epoch, r.ok, r.created_at) for r in report] == [(1, False, None)]


def test_manifest_of_another_epoch_is_found(store: CheckpointStore, tmp_path: Path) -> None:
    _checkpoint(store, tmp_path, 1)
    Path(store.epoch_path(2)).mkdir(parents=True)
    Path(store.manifest_path(2)).write_bytes(Path(store.manifest_path(1)).read_bytes())  # copied by hand
    (problem,) = verify_checkpoint(store, 2)
    assert problem.what == "manifest" and "epoch 1" in problem.problem


def _strip_digests(store: CheckpointStore, epoch: int) -> None:
    """Rewrite a manifest as code from before digests wrote it: no `state_digests` keys."""
    m = Path(store.manifest_path(epoch))
    data = json.loads(m.read_text())
    for op in data["operators"].values():
        del op["state_digests"]
    m.write_text(json.dumps(data))


def test_old_manifest_without_digests_stays_readable(store: CheckpointStore, tmp_path: Path) -> None:
    manifest = _checkpoint(store, tmp_path, 1)
    _strip_digests(store, 1)
    old = store.read_manifest(1)
    assert old is not None and old.operators["gen"].state_digests == {}
    assert old.operators["gen"].state_files == manifest.operators["gen"].state_files
    assert verify_checkpoint(store, 1) == []
    # without digests a truncated file is still found: it no longer reads as an Arrow file
    f = _state_file(store, manifest, 0)
    f.write_bytes(f.read_bytes()[:-40])
    (problem,) = verify_checkpoint(store, 1)
    assert problem.file == str(f) and "not a readable Arrow file" in problem.problem


def test_verifying_epochs_skips_corrupt_ones(store: CheckpointStore, tmp_path: Path) -> None:
    manifests = {e: _checkpoint(store, tmp_path, e) for e in (1, 2, 3, 4)}
    _state_file(store, manifests[2]).write_bytes(b"")
    assert verifying_epochs(store, below=4) == [3, 1]
    assert verifying_epochs(store, below=4, limit=1) == [3]
    assert verifying_epochs(store, below=1) == []
    assert [(r.epoch, r.ok) for r in report_checkpoints(store)] == [(1, True), (2, False), (3, True), (4, True)]


# ------------------------------------------------------------------------------ errors


def test_corrupt_restore_point_is_a_non_retryable_error_naming_file_and_alternatives(
    store: CheckpointStore, tmp_path: Path
) -> None:
    manifests = {e: _checkpoint(store, tmp_path, e) for e in (1, 2, 3)}
    f = _state_file(store, manifests[3], 1)
    f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(ApplicationError) as caught:
        restore_point(store, 3)
    err = caught.value
    assert err.type == CORRUPT_CHECKPOINT_TYPE and err.non_retryable
    assert err.details == ({"epoch": 3, "file": str(f), "problem": err.details[0]["problem"]},)  # type: ignore[index]
    assert err.message.startswith(f"checkpoint epoch 3 is corrupt: state file {f}: size 10 bytes")
    assert "epochs that verify: 2, 1" in err.message
    assert f"sluice restart {JOB} --restore-epoch 2" in err.message


def test_no_older_checkpoint_verifies_says_start_fresh(store: CheckpointStore, tmp_path: Path) -> None:
    _checkpoint(store, tmp_path, 1)
    m = Path(store.manifest_path(1))
    m.write_text("{")
    with pytest.raises(ApplicationError) as caught:
        restore_point(store, 1)
    assert caught.value.message.startswith(f"checkpoint epoch 1 is corrupt: manifest {m}: not a valid manifest")
    assert "no older checkpoint verifies" in caught.value.message and "--ignore-state" in caught.value.message


def test_read_state_names_the_file(store: CheckpointStore, tmp_path: Path) -> None:
    manifest = _checkpoint(store, tmp_path, 5)
    gen = manifest.operators["gen"]
    path = gen.state_files[0]
    f = _state_file(store, manifest, 0)
    f.write_bytes(f.read_bytes()[:-8])
    for digest in (gen.state_digests[path], None):  # with a digest, and as for an old manifest
        with pytest.raises(CorruptCheckpointError) as caught:
            store.read_state(path, digest)
        assert caught.value.epoch == 5 and caught.value.file == str(f)
        assert str(caught.value).startswith(f"checkpoint epoch 5 is corrupt: state file {f}: ")
    # a flipped byte: the size is right, only the hash (when asked for) finds it
    path1, f1 = gen.state_files[1], _state_file(store, manifest, 1)
    data = bytearray(f1.read_bytes())
    data[len(data) // 2] ^= 0x01
    f1.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="sha256 mismatch"):
        store.read_state(path1, gen.state_digests[path1], check_sha256=True)
    f.unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        store.read_state(path)


def test_corrupt_checkpoint_error_survives_a_message_prefix() -> None:
    err = CorruptCheckpointError(7, "/s/ckpt/j/checkpoints/epoch-0000000007/gen-0.arrow", "size 1 bytes, expected 2")
    parsed = CorruptCheckpointError.parse(f"operator 'gen' subtask 0: {err}; operator 'gen' subtask 1: {err}")
    assert parsed is not None
    assert (parsed.epoch, parsed.file, parsed.problem, parsed.what) == (err.epoch, err.file, err.problem, "state file")
    assert CorruptCheckpointError.parse("operator 'gen' subtask 0: open failed: ValueError: x") is None
    error = corrupt_checkpoint_error(
        CheckpointStore("/nonexistent-store", "j"), [CheckpointProblem(7, err.file, err.problem)]
    )
    assert error.type == CORRUPT_CHECKPOINT_TYPE and "no older checkpoint verifies" in error.message


async def test_runner_restoring_a_corrupt_state_file_fails_not_retryable(
    store: CheckpointStore, tmp_path: Path
) -> None:
    """Defence in depth: the runner's own read of a state file names it and is not retryable."""
    manifest = _checkpoint(store, tmp_path, 2)
    f = _state_file(store, manifest, 0)
    f.write_bytes(b"not arrow at all")
    program = compile_program(_pipeline(tmp_path / "out"), JobConfig())
    ref = SubtaskRef(chain=0, index=0)
    task = SubtaskRunner(ref=ref, program=program, job_id=JOB, generation=2, store=store, restore=manifest,
                         on_event=lambda *_: None)
    with pytest.raises(TaskError) as caught:
        await task.open()
    assert caught.value.retryable is False
    assert str(f) in caught.value.message and "checkpoint epoch 2 is corrupt" in caught.value.message
    assert CorruptCheckpointError.parse(caught.value.message) is not None


# ------------------------------------------------------------------------------ compile


async def test_compile_counts_an_unparsable_manifest_as_the_latest(store: CheckpointStore, tmp_path: Path) -> None:
    """Never skip silently to an older epoch (that would duplicate committed output): the corrupt
    newest checkpoint stays the restore point, so restoring it reports it."""
    for e in (1, 2):
        _checkpoint(store, tmp_path, e)
    Path(store.manifest_path(2)).write_text('{"job_id": "jo')
    state = tmp_path / "state"
    ctx = ControllerContext(state_dir=state, secret=b"s", scheduler=ProcessScheduler(state, b"s"))
    spec = JobSpec(job_id=JOB, pipeline=_pipeline(tmp_path / "out"), checkpoint_url=str(tmp_path / "ckpt"))
    result = await CompileActivities(ctx).compile_program(CompileInput(spec=spec))
    assert (result.latest_epoch, result.highest_epoch) == (2, 2)


def test_write_state_digest_matches_for_a_large_table(store: CheckpointStore) -> None:
    """A multi-buffer table (many record batches, large columns) hashes the bytes that land on
    disk, whatever way the IPC writer splits its writes."""
    n = 200_000
    table = pa.table({"key": [f"key-{i}" for i in range(n)], "count": list(range(n))})
    table = pa.concat_tables([table] * 3)
    path, digest = store.write_state_file(9, "win", 0, table)
    data = Path(store.state_file_path(path)).read_bytes()
    assert (digest.size, digest.sha256) == (len(data), hashlib.sha256(data).hexdigest())


# ------------------------------------------------------------------------------ the CLI


def test_cli_lists_checkpoints_and_which_verify(store: CheckpointStore, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sluice.cli import app

    manifests = {e: _checkpoint(store, tmp_path, e) for e in (1, 2)}
    bad = _state_file(store, manifests[2])
    bad.write_bytes(bad.read_bytes()[:7])
    url = str(tmp_path / "ckpt")
    shown = CliRunner().invoke(app, ["checkpoints", JOB, "--checkpoint-url", url])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0] == f"checkpoints of job {JOB} in {url}"
    assert lines[2].split()[0] == "1" and lines[2].endswith("ok")
    assert lines[3].split()[0] == "2" and f"CORRUPT: state file {bad}: size 7 bytes" in lines[3]

    as_json = CliRunner().invoke(app, ["checkpoints", JOB, "--checkpoint-url", url, "--json"])
    body = json.loads(as_json.output)
    assert body["checkpoint_url"] == url
    assert [(c["epoch"], c["verified"]) for c in body["checkpoints"]] == [(1, True), (2, False)]
    assert body["checkpoints"][1]["problems"][0]["file"] == str(bad)
    assert body["checkpoints"][0]["size"] > 0 and body["checkpoints"][0]["created_at"]

    empty = CliRunner().invoke(app, ["checkpoints", "other-job", "--checkpoint-url", url])
    assert empty.exit_code == 0 and empty.output.strip() == f"no checkpoints of job other-job in {url}"


def test_cli_restore_epoch_usage_errors() -> None:
    from typer.testing import CliRunner

    from sluice.cli import EXIT_USAGE, app

    both = CliRunner().invoke(app, ["restart", "j", "--restore-epoch", "3", "--ignore-state"])
    assert both.exit_code == EXIT_USAGE and "--restore-epoch cannot be combined" in both.output
    zero = CliRunner().invoke(app, ["restart", "j", "--restore-epoch", "0"])
    assert zero.exit_code == EXIT_USAGE

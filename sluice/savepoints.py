"""Savepoints in the checkpoint store: checkpoints kept under a name, listed, disposed, and
copied into another job's store to start it from one.

A savepoint is a completed checkpoint plus a record, ``{job}/savepoints/{name}.json``
(:class:`~sluice.models.SavepointInfo`). Retention never deletes an epoch that a record names;
disposing removes the record first, then the epoch's files unless the job still needs them.

Functions here do blocking I/O: call them in a thread from async code.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow.fs as pafs
from pydantic import ValidationError

from sluice.models import PERIODIC_SAVEPOINT_PREFIX, CheckpointManifest, SavepointInfo
from sluice.storage import CheckpointStore

SAVEPOINTS_DIR = "savepoints"

RECORD_SUFFIX = ".json"


class SavepointError(Exception):
    """A savepoint that does not exist, cannot be read, or cannot be used: the message says which."""


def savepoints_path(store: CheckpointStore) -> str:
    return f"{store.job_root}/{SAVEPOINTS_DIR}"


def record_path(store: CheckpointStore, name: str) -> str:
    return f"{savepoints_path(store)}/{name}{RECORD_SUFFIX}"


def write_savepoint(
    store: CheckpointStore, name: str, manifest: CheckpointManifest, *, pipeline_name: str, version: str
) -> SavepointInfo:
    """Keep the completed checkpoint `manifest` as savepoint `name` (replacing a record of that name)."""
    size = sum(d.size for op in manifest.operators.values() for d in op.state_digests.values())
    info = SavepointInfo(
        name=name, job_id=store.job_id, epoch=manifest.epoch, created_at=manifest.created_at, size_bytes=size,
        pipeline_name=pipeline_name, pipeline_version=version,
    )  # fmt: skip
    store.publish(savepoints_path(store), f"{name}{RECORD_SUFFIX}", info.model_dump_json(indent=2).encode())
    return info


def list_savepoints(store: CheckpointStore) -> list[SavepointInfo]:
    """The job's savepoints, oldest epoch first; an unreadable record raises SavepointError."""
    selector = pafs.FileSelector(savepoints_path(store), allow_not_found=True, recursive=False)
    out: list[SavepointInfo] = []
    for entry in store.fs.get_file_info(selector):
        if entry.type != pafs.FileType.File or not entry.base_name.endswith(RECORD_SUFFIX):
            continue
        if entry.base_name.startswith("."):
            continue  # a record being published
        out.append(_read(store, entry.path))
    return sorted(out, key=lambda i: (i.epoch, i.name))


def read_savepoint(store: CheckpointStore, name: str) -> SavepointInfo:
    try:
        return _read(store, record_path(store, name))
    except FileNotFoundError:
        known = ", ".join(i.name for i in list_savepoints(store)) or "none"
        raise SavepointError(f"job {store.job_id!r} has no savepoint {name!r} (its savepoints: {known})") from None


def savepoint_taken(store: CheckpointStore, name: str, epoch: int) -> bool:
    """Whether `name` already names a savepoint of another epoch (a retry of `epoch` is not)."""
    path = record_path(store, name)
    if store.fs.get_file_info(path).type != pafs.FileType.File:
        return False
    try:
        return _read(store, path).epoch != epoch
    except SavepointError:
        return True  # an unreadable record is still never overwritten


def _read(store: CheckpointStore, path: str) -> SavepointInfo:
    with store.fs.open_input_stream(path) as f:
        data = f.read()
    try:
        return SavepointInfo.model_validate_json(data)
    except ValidationError as e:
        raise SavepointError(f"savepoint record {path} is not valid: {e.errors()[0]['msg']}") from None


def protected_epochs(store: CheckpointStore) -> set[int]:
    """Epochs that retention must keep because a savepoint names them."""
    return {i.epoch for i in list_savepoints(store)}


def dispose_savepoint(store: CheckpointStore, name: str, *, keep_epochs: set[int]) -> SavepointInfo:
    """Remove savepoint `name`; its checkpoint's files go too, unless `keep_epochs` (the job's
    restore point and the checkpoints retention keeps) or another savepoint still names the epoch."""
    info = read_savepoint(store, name)
    store.fs.delete_file(record_path(store, name))
    if info.epoch not in keep_epochs and info.epoch not in protected_epochs(store):
        store.delete_epochs([info.epoch])
    return info


def prune_periodic(store: CheckpointStore, keep: int) -> list[SavepointInfo]:
    """Remove the records of all but the newest `keep` periodic savepoints; returns those removed
    (their checkpoints are then deleted by retention like any other)."""
    periodic = [i for i in list_savepoints(store) if i.name.startswith(PERIODIC_SAVEPOINT_PREFIX)]
    doomed = periodic[:-keep] if keep > 0 else periodic
    for info in doomed:
        store.fs.delete_file(record_path(store, info.name))
    return doomed


def split_ref(ref: str) -> tuple[str, str]:
    """`JOB/NAME` -> (job id, name); the name is after the last slash."""
    job_id, sep, name = ref.rpartition("/")
    if not sep or not job_id or not name:
        raise SavepointError(f"savepoint reference {ref!r} is not JOB/NAME")
    return job_id, name


def copy_savepoint_into(source: CheckpointStore, name: str, target: CheckpointStore) -> SavepointInfo:
    """Make savepoint `name` of `source`'s job a completed checkpoint of `target`'s job (same
    epoch), so the target job restores it as its own and does not depend on the savepoint later.

    The copy holds the operators' state only: the savepoint's sink output was committed by the
    job that took it, so the copied manifest carries no sink commits to redo. Idempotent: an
    epoch the target already completed is left as it is."""
    info = read_savepoint(source, name)
    manifest = source.read_manifest(info.epoch)
    if manifest is None:
        raise SavepointError(
            f"savepoint {source.job_id}/{name} names epoch {info.epoch}, whose checkpoint is gone from {source.url}"
        )
    if info.epoch in target.completed_epochs():
        return info
    operators = {}
    for op_id, op in manifest.operators.items():
        for rel in op.state_files:
            src, dst = f"{source.job_root}/{rel}", f"{target.job_root}/{rel}"
            target.fs.create_dir(dst.rpartition("/")[0], recursive=True)
            _copy(source, src, target, dst)
        operators[op_id] = op.model_copy(update={"commits": []})
    # Written as the generation the target's fence names (0 before its first start), so the
    # fence admits it; the target restores it like any checkpoint of its own.
    copied = manifest.model_copy(update={
        "job_id": target.job_id, "generation": target.read_fence().generation, "operators": operators,
        "created_at": datetime.now(UTC),
    })  # fmt: skip
    target.write_manifest(copied)
    return info


def _copy(source: CheckpointStore, src: str, target: CheckpointStore, dst: str) -> None:
    with source.fs.open_input_stream(src) as fin, target.fs.open_output_stream(dst) as fout:
        while chunk := fin.read(8 << 20):
            fout.write(chunk)

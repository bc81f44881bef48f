"""Checkpoint store: per-epoch operator state files and the manifest that proves a checkpoint exists.

Layout under the store's URL (a plain local directory or any pyarrow.fs URI such as ``s3://b/p``)::

    {url}/{job_id}/checkpoints/epoch-{E:010d}/{operator}-{subtask}.arrow   Arrow IPC file per subtask
    {url}/{job_id}/checkpoints/epoch-{E:010d}/manifest.json                CheckpointManifest, LAST

Guarantees:

* The manifest is written after every state file of its epoch and atomically (temp file + rename on a
  local filesystem; object stores publish a single PUT atomically), so a reader sees either no
  manifest or a whole one.
* An epoch directory without a manifest (a checkpoint that failed or is still being taken) is never
  reported as a checkpoint: :meth:`CheckpointStore.completed_epochs` and
  :meth:`CheckpointStore.latest_manifest` only look at manifests.
* State file paths returned by :meth:`CheckpointStore.write_state` (and recorded in manifests) are
  relative to the job's directory in the store, so a checkpoint can be read through any URL that
  points at the same place (another mount point, another host).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from sluice.models import CheckpointManifest, OperatorCheckpoint, Program, SubtaskSnapshot

CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "manifest.json"
STATE_SUFFIX = ".arrow"
_EPOCH_DIR = re.compile(r"^epoch-(\d{10})$")


def epoch_dir_name(epoch: int) -> str:
    """The directory name of one epoch; zero-padded so names sort like numbers."""
    return f"epoch-{epoch:010d}"


def _resolve(url: str) -> tuple[pafs.FileSystem, str, bool]:
    """The filesystem, root path inside it, and whether it is the local filesystem."""
    if "://" in url:
        fs, root = pafs.FileSystem.from_uri(url)
        return fs, root.rstrip("/"), isinstance(fs, pafs.LocalFileSystem)
    # A plain path: resolved once so that a later chdir cannot move the store.
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(url)), True


class CheckpointStore:
    """Reads and writes one job's checkpoints; safe to use from several processes at once."""

    def __init__(self, url: str, job_id: str) -> None:
        self.url = url
        self.job_id = job_id
        self._fs, root, self._local = _resolve(url)
        self._job_root = f"{root}/{job_id}"
        self._checkpoints = f"{self._job_root}/{CHECKPOINTS_DIR}"

    # ---------------------------------------------------------------- paths

    @property
    def job_root(self) -> str:
        """The job's directory inside the store's filesystem."""
        return self._job_root

    def epoch_path(self, epoch: int) -> str:
        return f"{self._checkpoints}/{epoch_dir_name(epoch)}"

    def manifest_path(self, epoch: int) -> str:
        return f"{self.epoch_path(epoch)}/{MANIFEST_NAME}"

    def _abs(self, relative: str) -> str:
        return f"{self._job_root}/{relative}"

    # ---------------------------------------------------------------- state files

    def write_state(self, epoch: int, operator_id: str, subtask_index: int, table: pa.Table) -> str:
        """Write one operator subtask's state for `epoch`; returns its path relative to the job root.

        Rewriting the same (epoch, operator, subtask) replaces the file, so a retried snapshot is
        harmless; it only becomes part of a checkpoint once a manifest names it.
        """
        relative = f"{CHECKPOINTS_DIR}/{epoch_dir_name(epoch)}/{operator_id}-{subtask_index}{STATE_SUFFIX}"
        self._fs.create_dir(self.epoch_path(epoch), recursive=True)
        with self._fs.open_output_stream(self._abs(relative)) as out:
            with ipc.new_file(out, table.schema) as writer:
                writer.write_table(table)
        return relative

    def read_state(self, path: str) -> pa.Table:
        """Read a state file written by :meth:`write_state` (its path as recorded in a manifest)."""
        with self._fs.open_input_file(self._abs(path)) as f:
            return ipc.open_file(f).read_all()

    # ---------------------------------------------------------------- manifests

    def write_manifest(self, manifest: CheckpointManifest) -> str:
        """Publish the checkpoint: call only after every state file of the epoch is written.

        Returns the manifest's path in the store's filesystem.
        """
        if manifest.job_id != self.job_id:
            raise ValueError(f"manifest of job {manifest.job_id!r} written to the store of {self.job_id!r}")
        final = self.manifest_path(manifest.epoch)
        data = manifest.model_dump_json(indent=2).encode()
        self._fs.create_dir(self.epoch_path(manifest.epoch), recursive=True)
        if self._local:
            # Temp name starts with '.', so no listing ever mistakes it for the manifest; rename is
            # atomic on a local filesystem. fsync before the rename so a crash cannot publish a
            # manifest whose bytes are not on disk yet.
            tmp = f"{self.epoch_path(manifest.epoch)}/.{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
            _fsync_dir(self.epoch_path(manifest.epoch))
        else:
            # Object stores make a single PUT visible atomically when the stream closes.
            with self._fs.open_output_stream(final) as out:
                out.write(data)
        return final

    def read_manifest(self, epoch: int) -> CheckpointManifest | None:
        """The manifest of `epoch`, or None when that epoch has no (complete) checkpoint."""
        try:
            with self._fs.open_input_stream(self.manifest_path(epoch)) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return CheckpointManifest.model_validate_json(data)

    def latest_manifest(self) -> CheckpointManifest | None:
        """The manifest of the highest completed epoch, or None when there is no checkpoint."""
        for epoch in reversed(self.completed_epochs()):
            manifest = self.read_manifest(epoch)
            if manifest is not None:  # deleted between listing and reading: try the previous one
                return manifest
        return None

    # ---------------------------------------------------------------- listing and retention

    def epochs_seen(self) -> list[int]:
        """Sorted epochs that have a directory, complete or not (for retention of failed attempts)."""
        return self._epoch_dirs()

    def _epoch_dirs(self) -> list[int]:
        selector = pafs.FileSelector(self._checkpoints, allow_not_found=True, recursive=False)
        epochs = []
        for info in self._fs.get_file_info(selector):
            m = _EPOCH_DIR.match(info.base_name)
            if m and info.type == pafs.FileType.Directory:
                epochs.append(int(m.group(1)))
        return sorted(epochs)

    def completed_epochs(self) -> list[int]:
        """Sorted epochs that have a manifest: the only ones that are checkpoints."""
        dirs = self._epoch_dirs()
        if not dirs:
            return []
        infos = self._fs.get_file_info([self.manifest_path(e) for e in dirs])
        return [e for e, info in zip(dirs, infos) if info.type == pafs.FileType.File]

    def highest_epoch_seen(self) -> int:
        """The highest epoch with any directory (complete or not), 0 if none.

        A new checkpoint must use a higher epoch, so it never mixes with files of a failed attempt.
        """
        dirs = self._epoch_dirs()
        return dirs[-1] if dirs else 0

    def delete_epochs(self, epochs: Iterable[int]) -> None:
        """Delete whole epoch directories; missing ones are ignored.

        The manifest goes first so that a crash half-way leaves an incomplete epoch (ignored), never
        a manifest that names deleted state files.
        """
        for epoch in epochs:
            try:
                self._fs.delete_file(self.manifest_path(epoch))
            except FileNotFoundError:
                pass
            try:
                self._fs.delete_dir(self.epoch_path(epoch))
            except FileNotFoundError:
                pass


def manifest_from_snapshots(
    *,
    job_id: str,
    epoch: int,
    generation: int,
    program: Program,
    snapshots: Iterable[SubtaskSnapshot],
    then_stop: bool = False,
) -> CheckpointManifest:
    """Merge every subtask's snapshot of `epoch` into the manifest to write (controller helper).

    Checks that each subtask of the program contributed exactly once, so a manifest can never be
    written from a partial set of snapshots. State files and commits are listed in subtask order.
    """
    by_ref: dict[tuple[int, int], SubtaskSnapshot] = {}
    for snap in snapshots:
        if snap.epoch != epoch:
            raise ValueError(f"snapshot of subtask {snap.subtask.label()} is for epoch {snap.epoch}, not {epoch}")
        by_ref[(snap.subtask.chain, snap.subtask.index)] = snap
    expected = {(r.chain, r.index) for r in program.subtasks()}
    missing = sorted(expected - set(by_ref))
    extra = sorted(set(by_ref) - expected)
    if missing or extra:
        raise ValueError(f"epoch {epoch}: snapshots missing for subtasks {missing}, unexpected {extra}")
    operators = {
        op_id: OperatorCheckpoint(parallelism=program.parallelism[op_id]) for op_id in program.operators
    }
    for key in sorted(by_ref):
        for op_id, op_snap in by_ref[key].operators.items():
            operators[op_id].state_files.extend(op_snap.state_files)
            operators[op_id].commits.extend(op_snap.commits)
    return CheckpointManifest(
        job_id=job_id,
        epoch=epoch,
        generation=generation,
        created_at=datetime.now(timezone.utc),
        then_stop=then_stop,
        operators=operators,
    )


def _fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Checkpoint store: per-epoch operator state files and the manifest that proves a checkpoint exists.

Layout under the store's URL (a plain local directory or any pyarrow.fs URI such as ``s3://b/p``)::

    {url}/{job_id}/checkpoints/epoch-{E:010d}/{operator}-{subtask}.arrow   Arrow IPC file per subtask
    {url}/{job_id}/checkpoints/epoch-{E:010d}/manifest.json                CheckpointManifest, LAST
    {url}/{job_id}/_fence.json                                             GenerationFence
    {url}/{job_id}/savepoints/{name}.json                                  SavepointInfo (sluice.savepoints)

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
* Every state file's size and SHA-256 are computed while it is written (no second read) and
  recorded in the manifest; :func:`verify_checkpoint` checks a checkpoint against them before it is
  restored, and :meth:`CheckpointStore.read_state` checks again (and names the file) when a runner
  reads it. Manifests written before digests existed stay readable: their state files are only
  checked to be readable Arrow files.
* Fencing by generation: ``_fence.json`` names the newest generation of the job that has started
  (:meth:`CheckpointStore.raise_fence`, called by every new generation before it recovers sinks or
  starts a task). A manifest is published only if the fence names the manifest's generation (or no
  generation yet), checked right before the atomic publish, so a generation cut off by a partition
  can never complete a checkpoint once a newer one has started (:class:`~sluice.errors.StaleGeneration`).
  The fence lives outside ``checkpoints/``, so listing and retention never see it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
from pydantic import BaseModel, Field, ValidationError

from sluice.errors import CorruptCheckpointError, StaleGeneration
from sluice.fsutil import fsync_dir
from sluice.models import (
    CheckpointManifest,
    OperatorCheckpoint,
    Program,
    StateFileDigest,
    SubtaskSnapshot,
)

CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "manifest.json"
STATE_SUFFIX = ".arrow"
#: the job's generation fence, in the job's directory: '_' so no epoch listing ever matches it
FENCE_NAME = "_fence.json"
#: serialises raises of the fence between processes on a local filesystem ('.': hidden)
FENCE_LOCK_NAME = ".fence.lock"
_EPOCH_DIR = re.compile(r"^epoch-(\d{10})$")
_EPOCH_IN_PATH = re.compile(r"(?:^|/)epoch-(\d{10})/")
#: bytes read at a time when hashing a state file for verification (hashlib releases the GIL)
HASH_CHUNK_BYTES = 8 << 20


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


class GenerationFence(BaseModel):
    """The content of ``_fence.json``: the newest generation of the job that has started.

    `started_at` is when that generation started (the Temporal server's time of scheduling its
    start), when known: a new run of a job numbers its generations from 1 again, and only the start
    times tell its generations from those of the run before.
    """

    generation: int = Field(ge=0, description="0 = no generation has raised the fence yet")
    started_at: datetime | None = None
    raised_at: datetime | None = None

    def admits(self, generation: int) -> bool:
        """Whether `generation` may publish: it is the fenced generation, or nothing is fenced yet."""
        return self.generation in (0, generation)


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

    @property
    def fs(self) -> pafs.FileSystem:
        """The store's filesystem (paths of this class are paths in it)."""
        return self._fs

    def publish(self, directory: str, name: str, data: bytes) -> str:
        """Write the file `name` in `directory` (created if missing) all at once; returns its path."""
        self._fs.create_dir(directory, recursive=True)
        return self._publish(directory, name, data)

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
        return self.write_state_file(epoch, operator_id, subtask_index, table)[0]

    def write_state_file(
        self, epoch: int, operator_id: str, subtask_index: int, table: pa.Table
    ) -> tuple[str, StateFileDigest]:
        """:meth:`write_state`, also returning the file's size and SHA-256.

        The digest is computed from the bytes on their way to the file (no second read): for a
        45 MB state that adds a few tens of milliseconds to the write, in the caller's thread.
        """
        relative = f"{CHECKPOINTS_DIR}/{epoch_dir_name(epoch)}/{operator_id}-{subtask_index}{STATE_SUFFIX}"
        self._fs.create_dir(self.epoch_path(epoch), recursive=True)
        with self._fs.open_output_stream(self._abs(relative)) as out:
            sink = _DigestingSink(out)
            with ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        return relative, sink.digest()

    def state_file_path(self, path: str) -> str:
        """Where a state file (its path as recorded in a manifest) is in the store's filesystem."""
        return self._abs(path)

    def read_state(self, path: str, digest: StateFileDigest | None = None, *, check_sha256: bool = False) -> pa.Table:
        """Read a state file written by :meth:`write_state` (its path as recorded in a manifest).

        With `digest` (from the manifest) the file must have the recorded size, and with
        `check_sha256` also the recorded SHA-256. Runners leave the hash to the controller, which
        verifies the whole checkpoint just before a restore (every subtask reads every state file
        of its operators on restore, so hashing there would cost parallelism times over). Raises
        :class:`~sluice.errors.CorruptCheckpointError` naming the file when it is missing, cannot be
        read, does not match, or is not an Arrow file: restoring it again cannot help.
        """
        full = self._abs(path)
        epoch = _epoch_of(path)
        try:
            with self._fs.open_input_file(full) as f:
                data = f.read_buffer()
        except FileNotFoundError:
            raise CorruptCheckpointError(epoch, full, "missing") from None
        except OSError as e:
            raise CorruptCheckpointError(epoch, full, f"cannot be read ({e})") from e
        if digest is not None:
            sha256 = hashlib.sha256(memoryview(data)).hexdigest() if check_sha256 else digest.sha256
            problem = _digest_problem(data.size, sha256, digest)
            if problem:
                raise CorruptCheckpointError(epoch, full, problem)
        try:
            return ipc.open_file(pa.BufferReader(data)).read_all()
        except (pa.ArrowException, OSError, ValueError) as e:
            raise CorruptCheckpointError(epoch, full, f"not a readable Arrow file ({type(e).__name__}: {e})") from e

    # ---------------------------------------------------------------- manifests

    def write_manifest(self, manifest: CheckpointManifest) -> str:
        """Publish the checkpoint: call only after every state file of the epoch is written.

        The writer's generation is the manifest's (``manifest.generation``): right before the
        atomic publish the fence is read, and when it names another generation (a newer one has
        started) :class:`~sluice.errors.StaleGeneration` is raised and no manifest appears.
        Returns the manifest's path in the store's filesystem.
        """
        if manifest.job_id != self.job_id:
            raise ValueError(f"manifest of job {manifest.job_id!r} written to the store of {self.job_id!r}")
        directory = self.epoch_path(manifest.epoch)
        data = manifest.model_dump_json(indent=2).encode()
        self._fs.create_dir(directory, recursive=True)
        return self._publish(directory, MANIFEST_NAME, data, before=lambda: self.check_fence(manifest.generation))

    def _publish(self, directory: str, name: str, data: bytes, before: Callable[[], None] | None = None) -> str:
        """Make `data` the file `name` in `directory` (which exists) all at once: a reader sees the
        old file (or none) or the whole new one. `before` runs right before the publish; when it
        raises, nothing is published. Returns the file's path in the store's filesystem."""
        final = f"{directory}/{name}"
        if self._local:
            # Temp name starts with '.', so no listing ever mistakes it for the file; rename is
            # atomic on a local filesystem. fsync before the rename so a crash cannot publish a
            # file whose bytes are not on disk yet.
            tmp = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if before is not None:
                    before()
                os.replace(tmp, final)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
            fsync_dir(directory, best_effort=True)
        else:
            if before is not None:
                before()
            # Object stores make a single PUT visible atomically when the stream closes.
            with self._fs.open_output_stream(final) as out:
                out.write(data)
        return final

    def read_manifest(self, epoch: int) -> CheckpointManifest | None:
        """The manifest of `epoch`, or None when that epoch has no (complete) checkpoint.

        Raises pydantic's ValidationError when the file is not a valid manifest (see
        :func:`verify_checkpoint` for a verdict instead of an exception).
        """
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

    # ---------------------------------------------------------------- the generation fence

    @property
    def fence_path(self) -> str:
        """The job's generation fence in the store's filesystem."""
        return f"{self._job_root}/{FENCE_NAME}"

    def read_fence(self) -> GenerationFence:
        """The fence as recorded; generation 0 when no generation has raised it yet.

        Raises ValueError naming the file when it is there but not a fence (written by hand or a
        damaged disk: the writes themselves are atomic).
        """
        try:
            with self._fs.open_input_stream(self.fence_path) as f:
                data = f.read()
        except FileNotFoundError:
            return GenerationFence(generation=0)
        try:
            return GenerationFence.model_validate_json(data)
        except ValidationError as e:
            raise ValueError(
                f"generation fence {self.fence_path} of job {self.job_id!r} is not a fence ({_first_error(e)}); "
                "delete it: the next generation to start writes it again"
            ) from None

    def raise_fence(self, generation: int, *, started_at: datetime | None = None) -> GenerationFence:
        """Record that `generation` (started at `started_at`, the server's time, when known) has
        started; from then on only it may publish. Returns the fence as recorded afterwards.

        Monotonic: the fence never goes back to an older generation. Older is decided by start
        time when both generations' are known (a new run of the job numbers its generations from 1
        again, but starts later), else by number; asking to fence an older generation raises
        :class:`~sluice.errors.StaleGeneration` and changes nothing. Idempotent: raising the fenced
        generation again changes nothing (except recording its start time if that was unknown).
        Written atomically like a manifest; raises are serialised by a lock file on a local
        filesystem (object stores have no lock: there the workflow, which starts one generation at
        a time, is what serialises them).
        """
        if generation < 1:
            raise ValueError(f"generation must be >= 1, got {generation}")
        if started_at is not None and started_at.tzinfo is None:  # compared with aware times
            started_at = started_at.replace(tzinfo=UTC)
        with self._fence_lock():
            current = self.read_fence()
            after = self._fence_after(current, generation, started_at)
            if after is None:
                return current
            self._publish(self._job_root, FENCE_NAME, after.model_dump_json().encode())
            return after

    def check_fence(self, generation: int) -> None:
        """Raise :class:`~sluice.errors.StaleGeneration` unless `generation` may publish: the fence
        names it, or no generation has raised the fence yet. One small read; call it right before
        every publish."""
        fence = self.read_fence()
        if not fence.admits(generation):
            # A fence below `generation` can only be a newer run's (numbering from 1 again).
            raise StaleGeneration(self.job_id, generation, fence.generation, newer_run=fence.generation < generation)

    def _fence_after(
        self, current: GenerationFence, generation: int, started_at: datetime | None
    ) -> GenerationFence | None:
        """The fence once `generation` has started: a new record, None to keep `current`, or
        StaleGeneration when `generation` is older than the fenced one."""
        if started_at is not None and current.started_at is not None:
            mine, fenced = (started_at, generation), (current.started_at, current.generation)
            if mine == fenced:
                return None
            if mine < fenced:
                raise StaleGeneration(
                    self.job_id, generation, current.generation,
                    newer_run=current.generation <= generation,
                )
        elif generation < current.generation:
            raise StaleGeneration(self.job_id, generation, current.generation)
        elif generation == current.generation:
            if started_at is None or current.started_at is not None:
                return None
            return current.model_copy(update={"started_at": started_at})  # now with its start time
        return GenerationFence(generation=generation, started_at=started_at, raised_at=datetime.now(UTC))

    @contextlib.contextmanager
    def _fence_lock(self) -> Iterator[None]:
        """Exclusive between processes (and threads) for a read-modify-write of the fence."""
        self._fs.create_dir(self._job_root, recursive=True)
        if not self._local:
            yield
            return
        fd = os.open(f"{self._job_root}/{FENCE_LOCK_NAME}", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the fd is closed
            yield
        finally:
            os.close(fd)

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
            operators[op_id].state_digests.update(op_snap.state_digests)
            operators[op_id].commits.extend(op_snap.commits)
    return CheckpointManifest(
        job_id=job_id,
        epoch=epoch,
        generation=generation,
        created_at=datetime.now(UTC),
        then_stop=then_stop,
        operators=operators,
    )


# ---------------------------------------------------------------- verification


@dataclass(frozen=True)
class CheckpointProblem:
    """One reason a checkpoint cannot be restored: which file (its path in the store's
    filesystem), and what is wrong with it."""

    epoch: int
    file: str
    problem: str
    what: str = "state file"  # or "manifest"

    def error(self) -> CorruptCheckpointError:
        return CorruptCheckpointError(self.epoch, self.file, self.problem, what=self.what)

    def details(self) -> dict[str, Any]:
        """The details of a CorruptCheckpoint activity error."""
        return {"epoch": self.epoch, "file": self.file, "problem": self.problem}

    def __str__(self) -> str:
        return f"{self.what} {self.file}: {self.problem}"


@dataclass
class Verified:
    """The outcome of :func:`verify_checkpoint`: the manifest when it parsed, and every problem."""

    epoch: int
    manifest: CheckpointManifest | None
    problems: list[CheckpointProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.manifest is not None and not self.problems


def verify_checkpoint(store: CheckpointStore, epoch: int) -> list[CheckpointProblem]:
    """Everything wrong with checkpoint `epoch`; empty when it can be restored.

    The manifest must exist, parse, and be this job's and epoch's; every state file it names must
    exist with the recorded size and SHA-256 (files of a manifest without digests, written by older
    code, must be readable Arrow files instead). Reads every state file once; call it off the event
    loop. Problems are listed manifest first, then state files in manifest order.
    """
    return check_checkpoint(store, epoch).problems


def check_checkpoint(store: CheckpointStore, epoch: int) -> Verified:
    """:func:`verify_checkpoint`, also returning the manifest when it parsed."""
    manifest_file = store.manifest_path(epoch)

    def manifest_problem(problem: str) -> Verified:
        return Verified(epoch, None, [CheckpointProblem(epoch, manifest_file, problem, "manifest")])

    try:
        with store._fs.open_input_stream(manifest_file) as f:
            raw = f.read()
    except FileNotFoundError:
        return manifest_problem("missing")
    except OSError as e:
        return manifest_problem(f"cannot be read ({e})")
    try:
        manifest = CheckpointManifest.model_validate_json(raw)
    except ValidationError as e:
        return manifest_problem(f"not a valid manifest ({_first_error(e)}; {len(raw)} bytes)")
    if manifest.job_id != store.job_id or manifest.epoch != epoch:
        return manifest_problem(f"belongs to job {manifest.job_id!r} epoch {manifest.epoch}")
    files = [(path, op.state_digests.get(path)) for op in manifest.operators.values() for path in op.state_files]
    infos = store._fs.get_file_info([store.state_file_path(p) for p, _ in files]) if files else []
    problems: list[CheckpointProblem] = []
    for (path, digest), info in zip(files, infos):
        full = store.state_file_path(path)
        if info.type != pafs.FileType.File:
            problems.append(CheckpointProblem(epoch, full, "missing"))
            continue
        problem = _state_file_problem(store, full, info.size, digest)
        if problem:
            problems.append(CheckpointProblem(epoch, full, problem))
    return Verified(epoch, manifest, problems)


def verifying_epochs(store: CheckpointStore, below: int, limit: int | None = None) -> list[int]:
    """Completed epochs older than `below` that pass :func:`verify_checkpoint`, newest first (at
    most `limit` of them): the restore points a user can choose instead of a corrupt one."""
    found: list[int] = []
    for epoch in reversed(store.completed_epochs()):
        if epoch >= below:
            continue
        if not verify_checkpoint(store, epoch):
            found.append(epoch)
            if limit is not None and len(found) >= limit:
                break
    return found


@dataclass
class CheckpointReport:
    """One completed checkpoint as `sluice checkpoints` shows it."""

    epoch: int
    created_at: datetime | None  # from the manifest; None when it does not parse
    size: int  # bytes of every file in the epoch's directory
    then_stop: bool
    problems: list[CheckpointProblem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "size": self.size,
            "then_stop": self.then_stop,
            "verified": self.ok,
            "problems": [p.details() for p in self.problems],
        }


def report_checkpoints(store: CheckpointStore) -> list[CheckpointReport]:
    """Every completed checkpoint of the store's job, oldest first, each verified."""
    out: list[CheckpointReport] = []
    for epoch in store.completed_epochs():
        checked = check_checkpoint(store, epoch)
        selector = pafs.FileSelector(store.epoch_path(epoch), allow_not_found=True, recursive=True)
        size = sum(i.size or 0 for i in store._fs.get_file_info(selector) if i.type == pafs.FileType.File)
        m = checked.manifest
        out.append(CheckpointReport(
            epoch=epoch,
            created_at=m.created_at if m else None,
            size=size,
            then_stop=m.then_stop if m else False,
            problems=checked.problems,
        ))
    return out


def _state_file_problem(store: CheckpointStore, full: str, size: int, digest: StateFileDigest | None) -> str | None:
    try:
        if digest is None:  # a manifest from before digests: the file must at least read as Arrow
            with store._fs.open_input_file(full) as f:
                ipc.open_file(f).read_all()
            return None
        if size != digest.size:  # cheap, and says more than a hash mismatch
            return _digest_problem(size, "", digest)
        h = hashlib.sha256()
        read = 0
        with store._fs.open_input_stream(full) as f:
            while True:
                chunk = f.read_buffer(HASH_CHUNK_BYTES)
                if not chunk:
                    break
                h.update(memoryview(chunk))
                read += chunk.size
        return _digest_problem(read, h.hexdigest(), digest)
    except (pa.ArrowException, OSError, ValueError) as e:
        return f"not a readable Arrow file ({type(e).__name__}: {e})" if digest is None else f"cannot be read ({e})"


def _digest_problem(size: int, sha256: str, digest: StateFileDigest) -> str | None:
    if size != digest.size:
        return f"size {size} bytes, expected {digest.size} (truncated or rewritten)"
    if sha256 != digest.sha256:
        return (
            f"sha256 mismatch (sha256 {sha256[:16]}..., expected {digest.sha256[:16]}...; "
            f"size {size} bytes as expected)"
        )
    return None


def _first_error(e: ValidationError) -> str:
    errors = e.errors()
    first = errors[0] if errors else {"msg": str(e), "loc": ()}
    loc = ".".join(str(x) for x in first.get("loc", ()))
    more = f" and {len(errors) - 1} more" if len(errors) > 1 else ""
    return f"{loc + ': ' if loc else ''}{first['msg']}{more}"


def _epoch_of(path: str) -> int:
    """The epoch of a state file path as written by :meth:`CheckpointStore.write_state` (0 if none)."""
    m = _EPOCH_IN_PATH.search(path)
    return int(m.group(1)) if m else 0


class _DigestingSink:
    """A write-only file object for ``ipc.new_file`` that counts and hashes every byte on its way
    to `out`; the owner of `out` closes it."""

    def __init__(self, out: pa.NativeFile) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self._size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self._out.write(view)
        self._size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._out.flush()

    def tell(self) -> int:
        return self._size

    def close(self) -> None:
        self.closed = True

    def digest(self) -> StateFileDigest:
        return StateFileDigest(size=self._size, sha256=self._hash.hexdigest())

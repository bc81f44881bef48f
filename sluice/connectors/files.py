"""The ``files`` sink: exactly-once files through two-phase commit, as JSON Lines or Parquet.

Layout under the sink's ``path`` (a local directory; the compiler makes it absolute), where
``{ext}`` is the format (``jsonl`` or ``parquet``):

* ``_sluice_owner.json`` the owner marker: the path belongs to the job named there
  (:mod:`sluice.connectors.sink_owner`; claimed by the compile activity, checked again before
  every recover and commit), so no other job ever writes, publishes or cleans up here;
* ``.staging/inprogress-sub-{i:04d}-gen-{G}-{n}.{ext}`` rows received since the last barrier;
* ``.staging/epoch-{E:010d}-sub-{i:04d}-gen-{G}.{ext}`` at barrier E the in-progress file is
  completed (Parquet footer written), flushed, fsynced, closed and renamed to this name
  (pre-commit), and reported in the snapshot as
  ``{"staged": <that path>, "final": "{path}/part-{E:010d}-{i:04d}-{token}.{ext}"}``; an epoch in
  which the subtask received no row stages nothing;
* ``part-{E:010d}-{i:04d}-{token}.{ext}`` committed output: the controller publishes staged ->
  final after the manifest of epoch E is written (:meth:`FilesSink.commit`). ``token`` is 8 hex
  digits drawn when the subtask opens, so a file name is never reused: not by a later run of the
  job whose epochs start again (``ignore_state`` without its old checkpoints), nor by a restore.

Committed output is every file under ``path`` whose name does not start with ``.`` or ``_``; it is
never replaced or deleted: publishing is ``os.link`` (which fails if the name exists) followed by
unlinking the staged name, and an existing final file with other content stops the commit with
:class:`OutputConflict` instead of being overwritten.
``jsonl`` rows are JSON Lines as encoded by :mod:`sluice.connectors.jsonl` (timestamps as ISO-8601
UTC); ``parquet`` files hold the Arrow batches as they arrived (schema of the epoch's first batch;
later batches of the same epoch are cast to it), in row groups of up to :data:`PARQUET_ROW_GROUP_ROWS`.

Rows received after the last barrier (graceful stop, failure) stay in staging and are discarded by
:meth:`FilesSink.recover` before the next run, which replays them from the restored source offsets.
Both formats share this one code path; only the :class:`StagingWriter` differs.
"""

from __future__ import annotations

import errno
import filecmp
import os
import re
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from sluice.connectors.jsonl import encode_batch
from sluice.connectors.sink_owner import claim_path
from sluice.engine.operators import OperatorContext, OperatorState
from sluice.engine.sinks import Sink
from sluice.errors import UserError
from sluice.fsutil import fsync_dir
from sluice.models import CheckpointManifest, FilesSinkOperator

STAGING_DIR = ".staging"
#: errors creating the output directory that mean the path is wrong, not that the disk is unwell
UNCREATABLE_ERRNOS = frozenset({errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS})
WRITE_BUFFER_BYTES = 1 << 20
#: a Parquet row group is written when this many rows (or PARQUET_ROW_GROUP_BYTES) are buffered, so
#: that small input batches do not become tiny row groups
PARQUET_ROW_GROUP_ROWS = 128 * 1024
PARQUET_ROW_GROUP_BYTES = 64 << 20
#: hex digits of the per-subtask token in committed file names
TOKEN_HEX_DIGITS = 8
#: names this sink writes in its staging directory (recover deletes these and nothing else)
_STAGING_FILE = re.compile(r"^(inprogress-sub-\d+-gen-\d+-[0-9a-f]+|epoch-\d+-sub-\d+-gen-\d+)\.[a-z]+$")


class OutputConflict(UserError):
    """A committed file name is taken by a file with other content; it is never overwritten."""


def staging_dir(path: str) -> str:
    """The sink's pre-commit directory under its output directory `path`."""
    return os.path.join(path, STAGING_DIR)


def staged_name(path: str, epoch: int, subtask: int, generation: int, ext: str = "jsonl") -> str:
    """Where a subtask's output of `epoch` waits for the commit phase."""
    return os.path.join(staging_dir(path), f"epoch-{epoch:010d}-sub-{subtask:04d}-gen-{generation}.{ext}")


def new_token() -> str:
    """A fresh token for committed file names: random, so no name is ever used twice."""
    return uuid.uuid4().hex[:TOKEN_HEX_DIGITS]


def final_name(path: str, epoch: int, subtask: int, token: str, ext: str = "jsonl") -> str:
    """The committed name of a subtask's output of `epoch`; `token` is the subtask instance's."""
    return os.path.join(path, f"part-{epoch:010d}-{subtask:04d}-{token}.{ext}")


def committed_files(path: str) -> list[str]:
    """Committed output under `path` (recursively), sorted: names not starting with '.' or '_'."""
    out: list[str] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        out.extend(os.path.join(root, f) for f in files if not f.startswith((".", "_")))
    return sorted(out)


# ---------------------------------------------------------------- writers, one per format


class StagingWriter:
    """Writes one in-progress file of one format. ``seal`` makes it complete and durable."""

    #: file name extension of this format (also of the committed files)
    ext: str = ""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb", buffering=WRITE_BUFFER_BYTES)  # noqa: SIM115 - open until seal/abort

    def write(self, batch: pa.RecordBatch) -> None:
        """Append the rows of a non-empty batch."""
        raise NotImplementedError

    def flush(self) -> None:
        """Push buffered bytes to the OS (best effort; no durability promised)."""
        self._file.flush()

    def seal(self) -> None:
        """Complete the file, fsync and close it; afterwards it may be renamed and published."""
        self._finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def _finish(self) -> None:
        """Write whatever the format keeps buffered or needs at the end (e.g. a footer)."""

    def abort(self) -> None:
        """Close without completing (the file is left for ``recover`` to delete); never raises."""
        try:
            self._file.close()
        except OSError:
            pass


class JsonlWriter(StagingWriter):
    """JSON Lines, encoded by :func:`sluice.connectors.jsonl.encode_batch`."""

    ext = "jsonl"

    def write(self, batch: pa.RecordBatch) -> None:
        self._file.write(encode_batch(batch))


class ParquetWriter(StagingWriter):
    """One Parquet file; its schema is that of the first batch, later batches are cast to it."""

    ext = "parquet"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._pending_bytes = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if self._schema is None:
            self._schema = batch.schema
        elif not batch.schema.equals(self._schema):
            if sorted(batch.schema.names) != sorted(self._schema.names):
                raise ValueError(
                    f"parquet output {self.path}: a batch with columns ({_schema_text(batch.schema)}) in an "
                    f"epoch whose file has columns ({_schema_text(self._schema)}); one file holds one schema"
                )
            try:
                batch = pa.Table.from_batches([batch]).select(self._schema.names).cast(self._schema).to_batches()[0]
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError, IndexError) as exc:
                raise ValueError(
                    f"parquet output {self.path}: a batch with schema ({_schema_text(batch.schema)}) does not "
                    f"fit the file's schema ({_schema_text(self._schema)}): {exc}"
                ) from exc
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self._pending_bytes += batch.nbytes
        if self._pending_rows >= PARQUET_ROW_GROUP_ROWS or self._pending_bytes >= PARQUET_ROW_GROUP_BYTES:
            self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        assert self._schema is not None
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._file, self._schema)
        self._writer.write_table(pa.Table.from_batches(self._pending, schema=self._schema),
                                 row_group_size=PARQUET_ROW_GROUP_ROWS)
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0

    def flush(self) -> None:
        # Buffered rows become a row group only at the threshold or at seal: a Parquet file is not
        # readable before its footer anyway.
        self._file.flush()

    def _finish(self) -> None:
        self._write_pending()
        if self._writer is not None:
            self._writer.close()  # writes the footer; does not close self._file (we own it)
            self._writer = None

    def abort(self) -> None:
        self._pending = []
        super().abort()


def _schema_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


WRITERS: dict[str, type[StagingWriter]] = {"jsonl": JsonlWriter, "parquet": ParquetWriter}


# ---------------------------------------------------------------- the sink


class FilesSink(Sink):
    """Runner side: writes one staging file per epoch and subtask; pre-commits at each barrier.

    Guarantees (with the controller's commit/recover): every row reaches exactly one committed file
    once the checkpoint covering it completes; nothing of an incomplete epoch is ever visible.
    """

    type_name = "files"

    def __init__(self, operator_id: str, params: dict[str, Any]) -> None:
        super().__init__(operator_id, params)
        self.spec = FilesSinkOperator.model_validate(params)
        self.path = os.path.abspath(self.spec.path)
        self.format = self.spec.format
        self._writer_class = WRITERS[self.format]
        self._writer: StagingWriter | None = None
        self._rows = 0
        self._token = new_token()

    def open(self, ctx: OperatorContext, restored: list[pa.Table]) -> None:
        super().open(ctx, restored)
        self._token = new_token()  # each start of the subtask names its files afresh
        try:
            os.makedirs(staging_dir(self.path), exist_ok=True)
        except OSError as exc:
            raise _uncreatable(self.operator_id, self.spec.path, exc) from None

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        if self._writer is None:
            assert self.ctx is not None, "sink used before open()"
            name = (f"inprogress-sub-{self.ctx.subtask_index:04d}-gen-{self.ctx.generation}-"
                    f"{uuid.uuid4().hex[:8]}.{self._writer_class.ext}")
            self._writer = self._writer_class(os.path.join(staging_dir(self.path), name))
        self._writer.write(batch)
        self._rows += batch.num_rows

    def snapshot(self, epoch: int) -> OperatorState:
        if self._writer is None:
            return OperatorState()  # nothing arrived in this epoch: nothing to commit
        assert self.ctx is not None
        writer, self._writer = self._writer, None
        writer.seal()
        ext = writer.ext
        staged = staged_name(self.path, epoch, self.ctx.subtask_index, self.ctx.generation, ext)
        os.replace(writer.path, staged)
        fsync_dir(staging_dir(self.path))
        self._rows = 0
        final = final_name(self.path, epoch, self.ctx.subtask_index, self._token, ext)
        return OperatorState(commits=[{"staged": staged, "final": final}])

    def on_end(self) -> list[pa.RecordBatch]:
        # Nothing to flush downstream; the open staging file is sealed by the next barrier (a
        # bounded job's final checkpoint) or discarded by recover().
        if self._writer is not None:
            self._writer.flush()
        return []

    def close(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    # ------------------------------------------------------------ controller side

    @classmethod
    def claim(cls, params: dict[str, Any], job_id: str) -> None:
        """Make `job_id` the owner of the sink's path, or confirm it is (see
        :func:`sluice.connectors.sink_owner.claim_path`); raises ``SinkPathOwned`` otherwise."""
        try:
            claim_path(os.path.abspath(params["path"]), job_id)
        except UserError as e:
            raise UserError(f"files sink {params.get('id')!r}: {e}") from e
        except OSError as exc:
            raise _uncreatable(params.get("id"), params["path"], exc) from None

    @classmethod
    def commit(
        cls,
        params: dict[str, Any],
        commits: list[dict[str, Any]],
        *,
        before_publish: Callable[[], None] | None = None,
    ) -> int:
        """Publish every staged file under its final name, never replacing a file. Idempotent: a
        final file whose staged file is gone was published by an earlier call, one that is the
        staged file itself (a crash between link and unlink) or has its bytes is fine.
        Returns how many of `commits` are now published.

        `before_publish` (the generation fence check) runs right before each file gets its final
        name; when it raises, no further file is published, no staged file is removed (a later
        commit or recovery of the same checkpoint finishes the job), and the exception propagates.
        Raises FileNotFoundError when both are missing (the pre-committed output was lost) and
        :class:`OutputConflict` when the final name holds another file.
        """
        # Two passes so that a crash anywhere leaves every file durable under at least one name:
        # link every final name (then fsync those directories), only then drop the staged names.
        published = 0
        linked: list[str] = []
        final_dirs: set[str] = set()
        for c in commits:
            staged, final = c["staged"], c["final"]
            if os.path.exists(staged):
                os.makedirs(os.path.dirname(final), exist_ok=True)
                if before_publish is not None:
                    before_publish()
                _link_without_replacing(params, staged, final)
                linked.append(staged)
                final_dirs.add(os.path.dirname(final))
            elif not os.path.exists(final):
                raise FileNotFoundError(
                    f"files sink {params.get('id')!r}: staged output {staged} is missing and {final} "
                    "was never published"
                )
            published += 1
        for d in final_dirs:
            fsync_dir(d)
        for staged in linked:
            os.unlink(staged)
        for d in {os.path.dirname(staged) for staged in linked}:
            fsync_dir(d)
        return published

    @classmethod
    def recover(cls, params: dict[str, Any], manifest: CheckpointManifest | None) -> None:
        """Before a run restores `manifest` (None = fresh start): publish the commits the manifest
        holds for operator ``params['id']``, then delete every other staged file this sink wrote,
        i.e. output of epochs that never completed, which the restored sources will replay.
        Committed files are never touched, and nothing in staging that this sink did not name.
        """
        op = manifest.operators.get(params["id"]) if manifest is not None else None
        if op is not None and op.commits:
            cls.commit(params, op.commits)
        staging = staging_dir(os.path.abspath(params["path"]))
        if not os.path.isdir(staging):
            return
        for name in os.listdir(staging):
            if not _STAGING_FILE.match(name):
                continue
            try:
                os.unlink(os.path.join(staging, name))
            except (FileNotFoundError, IsADirectoryError):
                pass


def _uncreatable(operator_id: Any, path: str, exc: OSError) -> OSError | UserError:
    """What to raise when the output directory cannot be made: a `UserError` naming the path
    when the path itself is wrong (under a file, read-only, not ours: no retry can help), else
    `exc` itself (e.g. a full or failing disk: may pass, so the caller is retried)."""
    if exc.errno not in UNCREATABLE_ERRNOS:
        return exc
    return UserError(
        f"files sink {operator_id!r}: cannot create output directory {path!r}: "
        f"{os.strerror(exc.errno or 0)}{f' ({exc.filename})' if exc.filename else ''}"
    )


def _link_without_replacing(params: dict[str, Any], staged: str, final: str) -> None:
    """Give `staged` the name `final` too, never replacing an existing `final`. A `final` that
    already is `staged` (same inode: a crash came between link and unlink) or has the same bytes
    counts as published; any other file there raises :class:`OutputConflict`."""
    try:
        os.link(staged, final)  # fails if `final` exists: never overwrites
    except FileExistsError:
        if not (os.path.samefile(staged, final) or filecmp.cmp(staged, final, shallow=False)):
            raise OutputConflict(
                f"files sink {params.get('id')!r}: cannot publish {staged}: {final} already exists "
                "with other content, and committed output is never replaced; move that file away "
                "(this job did not write it) and restart the job: its recovery publishes the output"
            ) from None

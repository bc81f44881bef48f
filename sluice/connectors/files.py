"""The ``files`` sink: exactly-once files through two-phase commit.

Layout under the sink's ``path`` (a local directory; the compiler makes it absolute):

* ``.staging/inprogress-sub-{i:04d}-gen-{G}-{n}.jsonl`` rows received since the last barrier;
* ``.staging/epoch-{E:010d}-sub-{i:04d}-gen-{G}.jsonl`` at barrier E the in-progress file is
  flushed, fsynced, closed and renamed to this name (pre-commit), and reported in the snapshot as
  ``{"staged": <that path>, "final": "{path}/part-{E:010d}-{i:04d}.jsonl"}``; an epoch in which the
  subtask received no row stages nothing;
* ``part-{E:010d}-{i:04d}.jsonl`` committed output: the controller renames staged -> final after the
  manifest of epoch E is written (:meth:`FilesSink.commit`).

Committed output is every file under ``path`` whose name does not start with ``.`` or ``_``.
Rows are JSON Lines as encoded by :mod:`sluice.connectors.jsonl` (timestamps as ISO-8601 UTC).

Rows received after the last barrier (graceful stop, failure) stay in staging and are discarded by
:meth:`FilesSink.recover` before the next run, which replays them from the restored source offsets.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, BinaryIO

import pyarrow as pa

from sluice.connectors.jsonl import encode_batch
from sluice.engine.operators import OperatorContext, OperatorState
from sluice.engine.sinks import Sink
from sluice.models import CheckpointManifest

STAGING_DIR = ".staging"
WRITE_BUFFER_BYTES = 1 << 20


def staging_dir(path: str) -> str:
    return os.path.join(path, STAGING_DIR)


def staged_name(path: str, epoch: int, subtask: int, generation: int) -> str:
    return os.path.join(staging_dir(path), f"epoch-{epoch:010d}-sub-{subtask:04d}-gen-{generation}.jsonl")


def final_name(path: str, epoch: int, subtask: int) -> str:
    return os.path.join(path, f"part-{epoch:010d}-{subtask:04d}.jsonl")


def committed_files(path: str) -> list[str]:
    """Committed output under `path` (recursively), sorted: names not starting with '.' or '_'."""
    out: list[str] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        out.extend(os.path.join(root, f) for f in files if not f.startswith((".", "_")))
    return sorted(out)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesSink(Sink):
    """Runner side: writes one staging file per epoch and subtask; pre-commits at each barrier."""

    type_name = "files"

    def __init__(self, operator_id: str, params: dict[str, Any]) -> None:
        super().__init__(operator_id, params)
        self.path = os.path.abspath(params["path"])
        self.format = params.get("format", "jsonl")
        if self.format != "jsonl":
            raise ValueError(f"files sink {operator_id!r}: unsupported format {self.format!r}")
        self._file: BinaryIO | None = None
        self._in_progress: str | None = None
        self._rows = 0

    def open(self, ctx: OperatorContext, restored: list[pa.Table]) -> None:
        super().open(ctx, restored)
        os.makedirs(staging_dir(self.path), exist_ok=True)

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        if self._file is None:
            assert self.ctx is not None, "sink used before open()"
            name = f"inprogress-sub-{self.ctx.subtask_index:04d}-gen-{self.ctx.generation}-{uuid.uuid4().hex[:8]}.jsonl"
            self._in_progress = os.path.join(staging_dir(self.path), name)
            self._file = open(self._in_progress, "wb", buffering=WRITE_BUFFER_BYTES)
        self._file.write(encode_batch(batch))
        self._rows += batch.num_rows

    def snapshot(self, epoch: int) -> OperatorState:
        if self._file is None or self._in_progress is None:
            return OperatorState()  # nothing arrived in this epoch: nothing to commit
        assert self.ctx is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        staged = staged_name(self.path, epoch, self.ctx.subtask_index, self.ctx.generation)
        os.replace(self._in_progress, staged)
        _fsync_dir(staging_dir(self.path))
        self._in_progress = None
        self._rows = 0
        return OperatorState(commits=[{"staged": staged, "final": final_name(self.path, epoch, self.ctx.subtask_index)}])

    def on_end(self) -> list[pa.RecordBatch]:
        # Nothing to flush downstream; the open staging file is sealed by the next barrier (a
        # bounded job's final checkpoint) or discarded by recover().
        if self._file is not None:
            self._file.flush()
        return []

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    # ------------------------------------------------------------ controller side

    @classmethod
    def commit(cls, params: dict[str, Any], commits: list[dict[str, Any]]) -> int:
        """Rename every staged file to its final name. Idempotent: a final file whose staged file is
        gone was published by an earlier call. Returns how many of `commits` are now published.

        Raises FileNotFoundError when both are missing (the pre-committed output was lost).
        """
        published = 0
        touched: set[str] = set()
        for c in commits:
            staged, final = c["staged"], c["final"]
            if os.path.exists(staged):
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.replace(staged, final)
                touched.add(os.path.dirname(final))
            elif not os.path.exists(final):
                raise FileNotFoundError(
                    f"files sink {params.get('id')!r}: staged output {staged} is missing and {final} "
                    "was never published"
                )
            published += 1
        for d in touched:
            _fsync_dir(d)
        return published

    @classmethod
    def recover(cls, params: dict[str, Any], manifest: CheckpointManifest | None) -> None:
        """Before a run restores `manifest` (None = fresh start): publish the commits the manifest
        holds for operator ``params['id']``, then delete every other staged file, i.e. output of
        epochs that never completed, which the restored sources will replay.
        """
        op = manifest.operators.get(params["id"]) if manifest is not None else None
        if op is not None and op.commits:
            cls.commit(params, op.commits)
        staging = staging_dir(os.path.abspath(params["path"]))
        if not os.path.isdir(staging):
            return
        for name in os.listdir(staging):
            try:
                os.unlink(os.path.join(staging, name))
            except (FileNotFoundError, IsADirectoryError):
                pass

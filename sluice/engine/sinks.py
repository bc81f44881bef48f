"""The sink interface, including the controller-side half of two-phase commit.

Runner side (an instance per subtask): ``process`` writes rows to pre-commit storage and
``snapshot(epoch)`` seals the epoch's output, returning ``commits`` records (plain JSON dicts) that
travel in the checkpoint manifest.

Controller side (class methods, no instance, no runner): ``claim`` makes the job the owner of the
sink's destination (at compile time, and again before every recover and commit); ``commit``
publishes the records of a checkpoint once its manifest is written, calling ``before_publish``
right before each item it publishes (the controller's fence check: a generation that a newer one
has superseded raises there, and the sink publishes nothing further); ``recover`` runs before a job
restores a checkpoint. All must be idempotent: the controller retries them after crashes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from sluice.engine.operators import Operator
from sluice.models import CheckpointManifest


class Sink(Operator):
    """Base of sinks: consumes batches, emits nothing downstream."""

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        self.write(batch)
        return []

    def write(self, batch: pa.RecordBatch) -> None:
        raise NotImplementedError

    @classmethod
    def claim(cls, params: dict[str, Any], job_id: str) -> None:
        """Make `job_id` the only job writing to this sink's destination, or confirm it already is;
        raise a :class:`sluice.errors.UserError` naming the owner when another job is. Default: a
        sink whose destination can be shared claims nothing."""

    @classmethod
    def commit(
        cls,
        params: dict[str, Any],
        commits: list[dict[str, Any]],
        *,
        before_publish: Callable[[], None] | None = None,
    ) -> int:
        """Publish pre-committed output; idempotent. Returns how many items are published.

        `before_publish` is called right before each item is made visible; when it raises, that
        item and every later one stay unpublished and the exception propagates.
        """
        return 0

    @classmethod
    def recover(cls, params: dict[str, Any], manifest: CheckpointManifest | None) -> None:
        """Before restoring `manifest` (None = fresh start): publish its commits for this operator
        (``params['id']``) and discard every other pre-committed output."""

"""The operator interface every node of a chain implements, and what it hands to a checkpoint.

An operator is created once per subtask, opened with the state restored for it, then driven by its
task with record batches and in-band control messages, strictly in stream order:

* ``process(batch)`` for data, returning zero or more batches for the next operator;
* ``on_watermark(wm)`` when event time advances (may emit, e.g. closed windows);
* ``snapshot(epoch)`` at a checkpoint barrier, after every batch before the barrier was processed;
* ``on_end()`` at end-of-stream (flush whatever is held);
* ``close()`` always, last, also after a failure or cancellation (release resources, never flush).

State is handed to the checkpoint as one Arrow table per operator subtask. On restore an operator
receives the tables written by *every* subtask of the previous run (whose parallelism may have been
different) and keeps the part it now owns, so a rescale neither loses nor repeats anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from sluice.engine.messages import Watermark
from sluice.errors import UserError


@dataclass(frozen=True, slots=True)
class OperatorContext:
    """Where an operator instance runs: enough to name its files and pick its share of state."""

    job_id: str
    generation: int
    operator_id: str
    subtask_index: int
    parallelism: int
    restore_epoch: int | None = None


@dataclass(slots=True)
class OperatorState:
    """One operator subtask's contribution to a checkpoint.

    `table` is written to the checkpoint store by the task (None = nothing to store); `commits` are
    two-phase-commit records of a sink, published by the controller once the manifest is written.
    """

    table: pa.Table | None = None
    commits: list[dict[str, Any]] = field(default_factory=list)


class UserFunctionError(Exception):
    """User code raised (or returned something unusable); the job's failure domain is `user`."""

    def __init__(self, operator_id: str, fn_ref: str, cause: BaseException | str) -> None:
        what = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"user function {fn_ref!r} failed: {what}")
        self.operator_id = operator_id
        self.fn_ref = fn_ref
        self.what = what
        #: the user's exception (None when the function returned something unusable)
        self.cause = cause if isinstance(cause, BaseException) else None
        # A function raises sluice.errors.UserError to say that retrying cannot help: the job
        # fails at once instead of spending its restart budget.
        self.retryable = not isinstance(cause, UserError)


class Operator:
    """Base of every operator (sources and sinks included). Subclasses override what they need."""

    #: operator type name as written in pipeline files (``map``, ``files``, ...)
    type_name: str = ""

    def __init__(self, operator_id: str, params: dict[str, Any]) -> None:
        self.operator_id = operator_id
        self.params = params
        self.ctx: OperatorContext | None = None

    def open(self, ctx: OperatorContext, restored: list[pa.Table]) -> None:
        """Prepare to run; `restored` holds the state tables of every previous subtask (may be [])."""
        self.ctx = ctx

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """Transform one batch; the default passes it through."""
        return [batch]

    def on_watermark(self, watermark: Watermark) -> list[pa.RecordBatch]:
        """Event time advanced; return batches it releases (none by default)."""
        return []

    def snapshot(self, epoch: int) -> OperatorState:
        """State as of the barrier of `epoch`; stateless operators store nothing."""
        return OperatorState()

    def on_end(self) -> list[pa.RecordBatch]:
        """End of stream: return what the operator still holds (nothing by default)."""
        return []

    def close(self) -> None:
        """Release resources. Called exactly once, also after failure; must not raise."""

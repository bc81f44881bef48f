"""A chain: operators fused over forward edges, driven synchronously within one subtask.

The chain knows nothing about where its input comes from (its head source, or the task's input
gate) nor where its output goes (the task's output routers): the task hands it one message at a
time and gets the tail's output back. Every failure is reported
as :class:`OperatorFailed` naming the operator, so the task can say where it happened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pyarrow as pa

from sluice.engine.messages import Watermark
from sluice.engine.operators import Operator, OperatorState

T = TypeVar("T")


class OperatorFailed(Exception):
    """An operator's method raised; `cause` is the original exception."""

    def __init__(self, operator_id: str, cause: BaseException) -> None:
        super().__init__(f"operator {operator_id!r}: {type(cause).__name__}: {cause}")
        self.operator_id = operator_id
        self.cause = cause


class OperatorChain:
    """Runs batches and control messages through `operators` in order (the first may be a source,
    which the task polls itself; it is skipped for data but included in snapshots)."""

    def __init__(self, operators: list[Operator], *, head_is_source: bool) -> None:
        self.operators = operators
        self._body = operators[1:] if head_is_source else operators
        self.rows_in: dict[str, int] = {op.operator_id: 0 for op in operators}
        self.rows_out: dict[str, int] = {op.operator_id: 0 for op in operators}
        #: the operator called last (the one still busy while a call is in progress): a call that
        #: never returns is reported under this name
        self.current: str | None = None

    def _call(self, op: Operator, fn: Callable[[], T]) -> T:
        self.current = op.operator_id
        try:
            return fn()
        except OperatorFailed:
            raise
        except Exception as exc:
            raise OperatorFailed(op.operator_id, exc) from exc

    def _feed(self, op: Operator, batches: list[pa.RecordBatch]) -> list[pa.RecordBatch]:
        out: list[pa.RecordBatch] = []
        for b in batches:
            self.rows_in[op.operator_id] += b.num_rows
            out.extend(self._call(op, lambda b=b: op.process(b)))  # type: ignore[misc]
        return out

    def _count_out(self, op: Operator, batches: list[pa.RecordBatch]) -> list[pa.RecordBatch]:
        self.rows_out[op.operator_id] += sum(b.num_rows for b in batches)
        return batches

    def _through(self, batches: list[pa.RecordBatch]) -> list[pa.RecordBatch]:
        for op in self._body:
            if not batches:
                return []
            batches = self._count_out(op, self._feed(op, batches))
        return batches

    def source_emitted(self, source_id: str, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """A batch from the head source: count it and run it through the rest of the chain."""
        self.rows_out[source_id] += batch.num_rows
        return self._through([batch])

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """A batch from outside the chain (network input); returns the tail's output."""
        return self._through([batch])

    def _signal(self, method: Callable[[Operator], list[pa.RecordBatch]]) -> list[pa.RecordBatch]:
        # Each operator first processes what the operators before it released for this signal,
        # then handles the signal itself, so released rows keep their place before the signal.
        carry: list[pa.RecordBatch] = []
        for op in self._body:
            out = self._feed(op, carry)
            out.extend(self._call(op, lambda op=op: method(op)))  # type: ignore[misc]
            carry = self._count_out(op, out)
        return carry

    def watermark(self, watermark: Watermark) -> list[pa.RecordBatch]:
        """Event time advanced: operators may release batches, which flow downstream."""
        return self._signal(lambda op: op.on_watermark(watermark))

    def end(self) -> list[pa.RecordBatch]:
        """End of stream: each operator flushes after processing what upstream flushed into it."""
        return self._signal(lambda op: op.on_end())

    def snapshot(self, epoch: int) -> dict[str, OperatorState]:
        """Every operator's state at the barrier of `epoch`, in chain order."""
        return {op.operator_id: self._call(op, lambda op=op: op.snapshot(epoch)) for op in self.operators}  # type: ignore[misc]

    def close(self) -> None:
        """Close every operator; never raises (failures in close must not hide the real error)."""
        for op in self.operators:
            try:
                op.close()
            except Exception:  # noqa: BLE001
                pass

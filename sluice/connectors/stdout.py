"""The ``stdout`` sink: every row as one JSON line on the runner's standard output.

For debugging and demos. Rows are encoded by :func:`sluice.connectors.jsonl.encode_batch` (the same
encoding as the ``files`` sink's jsonl format) and written to whatever ``sys.stdout`` is when the
batch arrives, flushed after every batch. No two-phase commit: rows are printed as they arrive, so
after a failure and restore the rows since the last checkpoint are printed again (at least once).
"""

from __future__ import annotations

import sys
from typing import Any

import pyarrow as pa

from sluice.connectors.jsonl import encode_batch
from sluice.engine.sinks import Sink
from sluice.models import StdoutSinkOperator


class StdoutSink(Sink):
    """Prints each row as a JSON object on its own line; at-least-once."""

    type_name = "stdout"

    def __init__(self, operator_id: str, params: dict[str, Any]) -> None:
        super().__init__(operator_id, params)
        self.spec = StdoutSinkOperator.model_validate(params)

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        out = sys.stdout
        out.write(encode_batch(batch).decode("utf-8"))
        out.flush()

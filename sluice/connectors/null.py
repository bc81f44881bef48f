"""The ``null`` sink: discards every row (for benchmarks and tests).

The rows it receives are counted in the chain's ``records_in.<operator>`` metric like any
operator's; the sink itself only keeps a running count in :attr:`NullSink.rows` for tests.
It has no state and nothing to commit.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from sluice.engine.sinks import Sink
from sluice.models import NullSinkOperator


class NullSink(Sink):
    """Accepts batches and drops them."""

    type_name = "null"

    def __init__(self, operator_id: str, params: dict[str, Any]) -> None:
        super().__init__(operator_id, params)
        self.spec = NullSinkOperator.model_validate(params)
        #: rows discarded by this instance
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows

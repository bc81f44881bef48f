"""User functions of examples/clicks.yaml.

A filter function receives one Arrow record batch and returns a boolean mask of the rows to keep;
pyarrow.compute keeps it vectorised (no Python loop per record).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

# The generator's `value` column is uniform in [0, 1000): keep the top tenth as "big" clicks.
BIG_VALUE_THRESHOLD = 900


def is_big(batch: pa.RecordBatch) -> pa.Array:
    """Mask of the clicks whose value is at least BIG_VALUE_THRESHOLD."""
    return pc.greater_equal(batch.column("value"), pa.scalar(BIG_VALUE_THRESHOLD, pa.int64()))

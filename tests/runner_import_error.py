"""A user module that imports in the controller worker but not in a runner process (a missing
dependency on the runner hosts): the job fails while starting its tasks, without restarts."""

from __future__ import annotations

import sys

import pyarrow as pa

if "sluice" in sys.argv[0] and "runner" in sys.argv[0]:
    raise ImportError("no module named 'geo_lookup' on this runner host")


def identity(batch: pa.RecordBatch) -> pa.RecordBatch:
    return batch

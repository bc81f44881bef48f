"""User functions that test pipelines reference as `tests.pipeline_functions:NAME`."""

from __future__ import annotations

import os
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc

FAIL_MARKER_ENV = "SLUICE_TEST_FAIL_MARKER"

# Imported by a runner process: optionally make its start slow, to hold a job in Scheduling.
if "sluice" in sys.argv[0] and "runner" in sys.argv[0] and os.environ.get("SLUICE_TEST_SLOW_OPEN"):
    time.sleep(float(os.environ["SLUICE_TEST_SLOW_OPEN"]))


def keep_even(batch: pa.RecordBatch) -> pa.Array:
    """Filter: rows whose seq is even."""
    return pc.equal(pc.bit_wise_and(batch.column("seq"), 1), 0)


def add_one(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Map: value + 1."""
    i = batch.schema.get_field_index("value")
    return batch.set_column(i, "value", pc.add(batch.column("value"), 1))


def always_raises(batch: pa.RecordBatch) -> pa.RecordBatch:
    raise ValueError("boom: this user function always fails")


def fails_while_marker(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Fails while the file named by $SLUICE_TEST_FAIL_MARKER exists; consumes it if asked to."""
    marker = os.environ.get(FAIL_MARKER_ENV)
    if marker and os.path.exists(marker):
        if open(marker).read().strip() == "once":
            os.unlink(marker)
        raise RuntimeError(f"failing while {marker} exists")
    return batch


def slow_batches(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Map: sleeps $SLUICE_TEST_SLOW_BATCH seconds per batch, so barriers wait behind batches."""
    time.sleep(float(os.environ.get("SLUICE_TEST_SLOW_BATCH", "0")))
    return batch


def rejects_input(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Raises UserError: retrying cannot help, so the job fails without restarts."""
    from sluice.errors import UserError

    raise UserError("value column holds data this function refuses")


#: the one record `raises_on_one_record` refuses: split 0, seq BAD_SEQ
BAD_SEQ = 123


def raises_on_one_record(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Map: raises ValueError on the record of split 0 with seq BAD_SEQ (the same every run)."""
    bad = pc.and_(pc.equal(batch.column("split"), 0), pc.equal(batch.column("seq"), BAD_SEQ))
    if pc.any(bad).as_py():
        raise ValueError(f"bad record: split 0 seq {BAD_SEQ}")
    return batch


def sleeps_forever(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Map: never returns (a call that hangs, e.g. on a dead network peer)."""
    while True:
        time.sleep(3600)

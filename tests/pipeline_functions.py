"""User functions that test pipelines reference as `tests.pipeline_functions:NAME`."""

from __future__ import annotations

import os
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc

FAIL_MARKER_ENV = "SLUICE_TEST_FAIL_MARKER"
# Directory of the control files that steer `steered` and runner startup (tests/faults).
FAULT_DIR_ENV = "SLUICE_TEST_FAULT_DIR"
HOLD_OPEN_FILE = "hold-open"  # while it exists, a runner importing this module waits (Scheduling)
HOLD_FILE = "hold"  # while it exists, every batch of `steered` takes HOLD_SLICE_S
HELD_FILE = "held"  # touched by `steered` once it held a batch: the hold is in effect
HOLD_BLOCK_FILE = "hold-block"  # while it exists, a batch of `steered` does not return
HANG_ONCE_FILE = "hang"  # the first batch to remove it never returns
HANG_ALWAYS_FILE = "hang-always"  # while it exists, every batch never returns
# One held batch is short, so a runner whose event loop runs user code still answers between
# batches; a hold lasts as long as batches queue up behind it.
HOLD_SLICE_S = 0.25
# A runner never waits longer than this at startup, even if a test forgot its hold-open file.
# Longer than the control-plane fault tests take to bring their eight jobs into place on a loaded
# machine (their Scheduling job is held the whole time; a hold that ran out let it reach Running).
HOLD_OPEN_MAX_S = 150.0
HOLD_OPEN_POLL_S = 0.05
HANG_SLEEP_S = 3600.0
# A blocking hold never lasts longer than this, even if a test forgot its file.
HOLD_BLOCK_MAX_S = 120.0

_IN_RUNNER = "sluice" in sys.argv[0] and "runner" in sys.argv[0]


def _job_id() -> str | None:
    """The job this runner process runs (its `--job-id` argument), None outside a runner."""
    args = sys.argv
    for i, arg in enumerate(args[:-1]):
        if arg == "--job-id":
            return args[i + 1]
    return None


def _fault_file(name: str) -> str | None:
    """The control file `name` of this runner's job: $SLUICE_TEST_FAULT_DIR/{job id}/{name}.

    Per job, so that several jobs of one controller worker can be steered independently."""
    root, job_id = os.environ.get(FAULT_DIR_ENV), _job_id()
    return os.path.join(root, job_id, name) if root and job_id else None


def _exists(name: str) -> bool:
    path = _fault_file(name)
    return path is not None and os.path.exists(path)


# Imported by a runner process: optionally make its start slow, to hold a job in Scheduling.
if _IN_RUNNER and os.environ.get("SLUICE_TEST_SLOW_OPEN"):
    time.sleep(float(os.environ["SLUICE_TEST_SLOW_OPEN"]))
if _IN_RUNNER and _exists(HOLD_OPEN_FILE):
    _until = time.monotonic() + HOLD_OPEN_MAX_S
    while _exists(HOLD_OPEN_FILE) and time.monotonic() < _until:
        time.sleep(HOLD_OPEN_POLL_S)


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


def steered(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Map: identity, steered by control files in $SLUICE_TEST_FAULT_DIR (tests/faults).

    - `hold`: while it exists each batch takes HOLD_SLICE_S (and `held` is touched), so
      barriers, final checkpoints and graceful stops queue behind batches: the test holds the job
      in a state for as long as it needs, then removes the file and the backlog drains at once;
    - `hold-block`: while it exists, a batch does not return (touching `held`): a hold of any
      length, for runners that call user code off their event loop (JobConfig.task_hang_timeout_s
      must be longer than the hold);
    - `hang`: the first batch that removes it never returns (a user function that hangs once);
    - `hang-always`: while it exists, every batch never returns (a hang that recurs).
    """
    if _exists(HANG_ALWAYS_FILE):
        time.sleep(HANG_SLEEP_S)
    hang = _fault_file(HANG_ONCE_FILE)
    if hang is not None:
        try:
            os.unlink(hang)  # exactly one caller wins, so exactly one batch hangs
        except FileNotFoundError:
            pass
        else:
            time.sleep(HANG_SLEEP_S)
    if _exists(HOLD_BLOCK_FILE):
        held = _fault_file(HELD_FILE)
        assert held is not None
        open(held, "a").close()
        until = time.monotonic() + HOLD_BLOCK_MAX_S
        while _exists(HOLD_BLOCK_FILE) and time.monotonic() < until:
            time.sleep(HOLD_OPEN_POLL_S)
    if _exists(HOLD_FILE):
        held = _fault_file(HELD_FILE)
        assert held is not None
        open(held, "a").close()
        time.sleep(HOLD_SLICE_S)
    return batch


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


"""Storage faults: the checkpoint store read-only, full or corrupt; the sink's directory read-only.

Each job keeps its checkpoints (or its output) on a small tmpfs of its own, which the case makes
read-only or fills up at the chosen moment (see tests/faults/mounts.py), and gives back once the
job reacted (a transient fault: the job must come back by itself). Expected (docs/states.md): a
checkpoint that cannot be written fails, so Running (also mid-checkpoint), Rescaling and
Restarting go to Recovering and run again once the store is back; CheckpointStopping ends Stopped
through Stopping (the restore point stays the last completed checkpoint). A store that stays full
is not a failure of the pipeline: the job retries within its restart budget, then fails naming the
problem (No space left on device); freed, a restart finishes the job.
A corrupt checkpoint is found when it is restored: the job fails at once, naming the epoch and the
file, and a run started with `restore_epoch` of an older checkpoint finishes. The sink's directory
read-only fails writing, pre-committing or publishing output; the job recovers once it is back
(while Scheduling a fresh job, its sink cannot be opened at all: the job fails naming the path).
Output is exactly-once throughout (see the corrupt case for the one documented exception).
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from sluice.models import JobStatus
from sluice.storage import CheckpointStore
from tests.e2e_helpers import Row, committed_files, describe_status
from tests.faults.harness import (
    RECOVERS,
    RESCALE_TO,
    RUNS_ON,
    TERMINAL,
    FaultJob,
    mounted_tmpfs,
    path_after,
    signal_runner,
)
from tests.faults.matrix import MATRIX_TIMEOUT_S, JobFactory, Matrix, run_matrix, selected
from tests.faults.mounts import Tmpfs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(MATRIX_TIMEOUT_S)]

TMPFS_BYTES = 32 << 20  # checkpoints and output of a case take well under 1 MB
STORE_STATES = ("Running", "Checkpoint", "CheckpointStopping", "Rescaling", "Restarting")
SINK_STATES = (
    "Scheduling", "Running", "Checkpoint", "CheckpointStopping", "Stopping", "Rescaling", "Restarting", "Recovering"
)
PERSISTENT = "Running, stays full"
CORRUPT_STATES = ("Recovering", "Scheduling")
STAYS_FULL_RESTARTS = 2
STORE_LIMIT = 800  # rows per split: 8 s of source time
STOPS = (["Stopping", "Stopped"], "Stopped")
# The path after a write fault (the job reacts in the state it is in).
EXPECTED: dict[str, tuple[list[str], str | tuple[str, ...]]] = {
    "Scheduling": (["Failing", "Failed"], "Failed"),  # see _sink_case
    "Running": (RECOVERS, RUNS_ON),
    "Checkpoint": (RECOVERS, RUNS_ON),
    "CheckpointStopping": STOPS,
    "Stopping": (["Stopped"], "Stopped"),
    "Rescaling": (RECOVERS, RUNS_ON),
    "Restarting": (RECOVERS, RUNS_ON),
    "Recovering": (["Compiling", "Scheduling"], RUNS_ON),
}


def _break(fs: Tmpfs, how: str) -> None:
    if how == "read-only":
        fs.read_only()
    else:
        fs.fill()


def _reacted(job: FaultJob, fs: Tmpfs) -> Callable[[JobStatus], None]:
    """Give the file system back once the job reacted to the fault (left its state for
    Recovering or Stopping, or ended)."""

    def check(st: JobStatus) -> None:
        after = path_after(st, job.fault_time) if job.fault_time else []
        if any(s in ("Recovering", "Stopping", "Stopped", "Failed") for s in after) or st.state in TERMINAL:
            fs.restore()

    return check


# ------------------------------------------------------------------------------ the store


async def _store_case(jobs: JobFactory, how: str, state: str) -> None:
    fault = f"checkpoint store {how}"
    name = "".join(c if c.isalnum() else "-" for c in f"{fault}-{state}".lower())
    with mounted_tmpfs(jobs.work_dir / f"{name}-store", TMPFS_BYTES) as fs:
        # A longer stream: a checkpoint's failure (after its retries) must come before the
        # sources end, or the job would meet it in Finishing instead (also legal, another row).
        job = jobs.new(fault, state, checkpoint_url=fs.path, limit=STORE_LIMIT)
        try:
            st = await job.enter(state)
            _break(fs, how)
            job.fault_injected(st)
            path, end = EXPECTED[state]
            after = await job.outcome(path, end=end, on_change=_reacted(job, fs))
            if state == "Rescaling":
                assert set(after.parallelism.values()) == {RESCALE_TO}, after.parallelism
            fs.restore()
            await job.finish()
        finally:
            fs.restore()
            await job.cleanup()


async def _store_stays_full(jobs: JobFactory) -> None:
    fault = "checkpoint store full (stays full)"
    with mounted_tmpfs(jobs.work_dir / "store-stays-full", TMPFS_BYTES) as fs:
        # Not a failure of the pipeline: it uses the restart budget (docs/lifecycle.md), small here.
        job = jobs.new(fault, "Running", checkpoint_url=fs.path, allowed_restarts=STAYS_FULL_RESTARTS)
        try:
            st = await job.enter("Running")
            fs.fill()
            job.fault_injected(st)
            failed = await job.outcome(["Recovering"], end="Failed")
            assert failed.failure is not None and "No space left on device" in failed.failure.message, (
                describe_status(failed)
            )
            fs.restore()  # the user frees space, then restarts the job
            await job.finish()
        finally:
            fs.restore()
            await job.cleanup()


# ------------------------------------------------------------------------------ corrupt


def _corrupt_state_file(store: CheckpointStore, epoch: int) -> str:
    """Overwrite the middle of one state file of `epoch` (same size, other bytes); returns its name."""
    manifest = store.read_manifest(epoch)
    assert manifest is not None
    files = [f for op in manifest.operators.values() for f in op.state_files]
    assert files, f"epoch {epoch} has no state files"
    target = Path(store.job_root) / files[0]
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    target.write_bytes(bytes(data))
    return target.name


def _rows_by_epoch(sink: Path) -> dict[int, list[Row]]:
    """Committed rows per epoch, from the part file names (part-{epoch}-...)."""
    out: dict[int, list[Row]] = {}
    for f in committed_files(sink):
        m = re.match(r"part-(\d+)-", f.name)
        assert m, f"unexpected committed file {f}"
        rows = out.setdefault(int(m.group(1)), [])
        for line in f.read_text().splitlines():
            if line.strip():
                o = json.loads(line)
                rows.append((o["split"], o["seq"], o["key"], o["value"]))
    return out


async def _corrupt_case(jobs: JobFactory, state: str) -> None:
    """Corrupt the checkpoint the job restores next, then make it restore: from Recovering (a
    runner killed), or when a Stopped job is resumed (Scheduling of the new run)."""
    job = jobs.new("checkpoint corrupt", state)
    try:
        await job.start()
        await job.until(lambda s: s.state == "Running" and s.epoch >= 2, "two checkpoints", 60.0)
        store = CheckpointStore(str(job.spec.checkpoint_url), job.job_id)
        if state == "Recovering":
            await job.hold()  # no checkpoint completes any more: the latest one is restored next
            epoch = store.completed_epochs()[-1]
            bad = _corrupt_state_file(store, epoch)
            st = await job.status()
            signal_runner(job.runner_pid(st), job.job_id, signal.SIGKILL)
            st = await job._wait_state("Recovering")
            job.fault_injected(st)
            failed = await job.outcome(["Compiling", "Scheduling"], end="Failed")
        else:  # Scheduling of a resumed run
            await job.job_client.stop(job.job_id, "checkpoint")
            stopped = await job._wait_state("Stopped")
            await job.wait_closed()
            epoch = stopped.epoch
            bad = _corrupt_state_file(store, epoch)
            job.fault_injected(stopped)
            await job.job_client.restart(job.job_id)
            failed = await job.outcome(["Compiling", "Scheduling"], end="Failed", check_landed=False)
        assert failed.failure is not None, describe_status(failed)
        message = failed.failure.message
        assert str(epoch) in message and bad in message, f"the failure must name epoch {epoch} and {bad}: {message}"
        # The user restores the checkpoint before the corrupt one.
        older = [e for e in store.completed_epochs() if e < epoch][-1]
        # Documented (docs/checkpoints.md): output committed after the restored checkpoint is
        # written again. Exactly those rows may appear twice; nothing else, and nothing lost.
        rewritten = [r for e, rows in _rows_by_epoch(job.sink).items() if e > older for r in rows]
        spec = job.spec.model_copy(
            update={"config": job.spec.config.model_copy(update={"restore_epoch": older, "stop": "none"})}
        )
        await job.finish(spec=spec, rewritten=rewritten)
    finally:
        await job.cleanup()


# ------------------------------------------------------------------------------ the sink


async def _sink_case(jobs: JobFactory, state: str) -> None:
    fault = "sink read-only"
    name = "".join(c if c.isalnum() else "-" for c in f"{fault}-{state}".lower())
    with mounted_tmpfs(jobs.work_dir / f"{name}-out", TMPFS_BYTES) as fs:
        job = jobs.new(fault, state, sink=fs.path)
        try:
            st = await job.enter(state)
            fs.read_only()
            job.fault_injected(st)
            path, end = EXPECTED[state]
            if state == "Scheduling":
                # The runners open the sink now, on a directory they cannot create their staging
                # directory in: a job that cannot start its sink fails at once (not retryable),
                # naming the path; once it is writable again, a restart runs the job.
                failed = await job.outcome(["Failing", "Failed"], end="Failed")
                assert failed.failure is not None and "Read-only file system" in failed.failure.message, (
                    describe_status(failed)
                )
                assert str(fs.path) in failed.failure.message, describe_status(failed)
                fs.restore()
                await job.finish()
                return
            after = await job.outcome(path, end=end, on_change=_reacted(job, fs))
            if state == "Rescaling":
                assert set(after.parallelism.values()) == {RESCALE_TO}, after.parallelism
            fs.restore()
            await job.finish()
        finally:
            fs.restore()
            await job.cleanup()


# ------------------------------------------------------------------------------ the tests


def _store_cases(jobs: JobFactory) -> dict[str, Callable[[], Awaitable[None]]]:
    cases: dict[str, Callable[[], Awaitable[None]]] = {}
    for how in ("read-only", "full"):
        for state in STORE_STATES:
            cases[f"{how}-{state}"] = lambda h=how, s=state: _store_case(jobs, h, s)
    cases[f"full-{PERSISTENT}"] = lambda: _store_stays_full(jobs)
    for state in CORRUPT_STATES:
        cases[f"corrupt-{state}"] = lambda s=state: _corrupt_case(jobs, s)
    return cases


STORE_KEYS = [
    *(f"read-only-{s}" for s in STORE_STATES),
    *(f"full-{s}" for s in (*STORE_STATES, PERSISTENT)),
    *(f"corrupt-{s}" for s in CORRUPT_STATES),
]


@pytest_asyncio.fixture(scope="module")
async def store(jobs: JobFactory, request: pytest.FixtureRequest) -> Matrix:
    cases = _store_cases(jobs)
    return await run_matrix({k: cases[k] for k in selected(request, STORE_KEYS)})


@pytest_asyncio.fixture(scope="module")
async def sink(jobs: JobFactory, request: pytest.FixtureRequest) -> Matrix:
    states = selected(request, list(SINK_STATES))
    return await run_matrix({state: (lambda s=state: _sink_case(jobs, s)) for state in states})


@pytest.mark.parametrize("case", [k for k in STORE_KEYS if k.startswith("read-only-")])
def test_checkpoint_store_read_only(store: Matrix, case: str) -> None:
    store.check(case)


@pytest.mark.parametrize("case", [k for k in STORE_KEYS if k.startswith("full-")])
def test_checkpoint_store_full(store: Matrix, case: str) -> None:
    store.check(case)


@pytest.mark.parametrize("case", [k for k in STORE_KEYS if k.startswith("corrupt-")])
def test_checkpoint_corrupt(store: Matrix, case: str) -> None:
    store.check(case)


@pytest.mark.parametrize("case", SINK_STATES)
def test_sink_read_only(sink: Matrix, case: str) -> None:
    sink.check(case)

"""A user function that never returns, in every state where user functions run.

The map `steered` hangs on one batch (control file `hang`: exactly one call sleeps forever). Expected
(docs/states.md, JobConfig.task_hang_timeout_s): after `task_hang_timeout_s` (3 s here) the task
fails, the failure names the operator (`operator 'work'`), and the job reacts as to any task failure:
Running (also mid-checkpoint), Rescaling and Restarting go to Recovering and run again;
CheckpointStopping's final checkpoint fails and the job ends Stopped; a graceful Stopping ends
Stopped (the stop cannot drain a hung task: the runners are killed). A hang that recurs on every
attempt (`hang-always`) fails the job after 3 identical failures, naming the operator; once the
function is fixed, a restart finishes the job. Output is exactly-once throughout.
"""

from __future__ import annotations

import pytest
import pytest_asyncio

from tests.e2e_helpers import describe_status
from tests.faults.harness import NAMES_MAP, RECOVERS, RESCALE_TO, RUNS_ON
from tests.faults.matrix import MATRIX_TIMEOUT_S, JobFactory, Matrix, run_matrix, selected
from tests.pipeline_functions import HANG_ALWAYS_FILE, HANG_ONCE_FILE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(MATRIX_TIMEOUT_S)]

FAULT = "hanging map"
# (path after the fault, end state, a text the first transition after the fault must contain)
EXPECTED: dict[str, tuple[list[str], str | tuple[str, ...], str | None]] = {
    "Running": (RECOVERS, RUNS_ON, NAMES_MAP),
    "Checkpoint": (RECOVERS, RUNS_ON, NAMES_MAP),
    "CheckpointStopping": (["Stopping", "Stopped"], "Stopped", NAMES_MAP),
    "Stopping": (["Stopped"], "Stopped", None),
    "Rescaling": (RECOVERS, RUNS_ON, NAMES_MAP),
    "Restarting": (RECOVERS, RUNS_ON, NAMES_MAP),
}
PERSISTENT = "Running, every attempt"


async def _once(jobs: JobFactory, state: str) -> None:
    job = jobs.new(FAULT, state)
    try:
        st = await job.enter(state)
        job.controls.set(HANG_ONCE_FILE)
        job.fault_injected(st)  # releases the hold: the next batch of the map hangs
        path, end, reason = EXPECTED[state]
        after = await job.outcome(path, end=end, reason=reason)
        assert not job.controls.present(HANG_ONCE_FILE), "no batch reached the hanging function"
        if state == "Rescaling":
            assert set(after.parallelism.values()) == {RESCALE_TO}, after.parallelism
        await job.finish()
    finally:
        await job.cleanup()


async def _persistent(jobs: JobFactory) -> None:
    job = jobs.new(FAULT + " (always)", "Running")
    try:
        st = await job.enter("Running")
        job.controls.set(HANG_ALWAYS_FILE)
        job.fault_injected(st)
        failed = await job.outcome(["Recovering"], end="Failed", reason=NAMES_MAP)
        assert failed.failure is not None and NAMES_MAP in failed.failure.message, describe_status(failed)
        job.controls.clear(HANG_ALWAYS_FILE)  # the user fixes the function, then restarts the job
        await job.finish()
    finally:
        await job.cleanup()


@pytest_asyncio.fixture(scope="module")
async def hangs(jobs: JobFactory, request: pytest.FixtureRequest) -> Matrix:
    cases = {state: (lambda s=state: _once(jobs, s)) for state in EXPECTED}
    cases[PERSISTENT] = lambda: _persistent(jobs)
    return await run_matrix({k: cases[k] for k in selected(request, list(cases))})


@pytest.mark.parametrize("case", [*EXPECTED, PERSISTENT])
def test_hanging_user_function(hangs: Matrix, case: str) -> None:
    hangs.check(case)

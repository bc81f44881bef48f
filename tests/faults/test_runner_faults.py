"""A runner process killed (SIGKILL) or frozen (SIGSTOP) in every state where runners exist.

Expected (docs/states.md): a lost runner sends Scheduling, Running (also mid-checkpoint),
Rescaling and Restarting to Recovering, and the job runs again on a new generation; during
CheckpointStopping the final checkpoint fails and the job ends Stopped through Stopping; a
graceful Stopping ends Stopped; a runner lost while the job already recovers changes nothing.
A frozen runner is lost once it misses `runner_heartbeat_timeout_s` (3 s here) of heartbeats, or,
while the job schedules, once `task_startup_timeout_s` passes. In every case no runner of an older
generation survives, and the committed output equals an uninterrupted run's.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable

import pytest
import pytest_asyncio

from tests.faults.harness import RECOVERS, RESCALE_TO, RUNS_ON, STATES, release_stopped, signal_runner
from tests.faults.matrix import MATRIX_TIMEOUT_S, JobFactory, Matrix, run_matrix, selected

pytestmark = [pytest.mark.slow, pytest.mark.timeout(MATRIX_TIMEOUT_S)]

# After the fault: the states the job goes through first, and where it is when we look.
EXPECTED: dict[str, tuple[list[str], str | tuple[str, ...]]] = {
    "Scheduling": (RECOVERS, RUNS_ON),
    "Running": (RECOVERS, RUNS_ON),
    "Checkpoint": (RECOVERS, RUNS_ON),
    "CheckpointStopping": (["Stopping", "Stopped"], "Stopped"),
    "Stopping": (["Stopped"], "Stopped"),
    "Rescaling": (RECOVERS, RUNS_ON),
    "Restarting": (RECOVERS, RUNS_ON),
    "Recovering": (RECOVERS[1:], RUNS_ON),
}
# A frozen runner answers nothing: while scheduling, only the start timeout notices it (each of
# the start activity's attempts waits this long), so it is short in that case.
STOPPED_RUNNER_START_TIMEOUT_S = 5.0


async def _case(jobs: JobFactory, fault: str, state: str, sig: signal.Signals) -> None:
    config = {"task_startup_timeout_s": STOPPED_RUNNER_START_TIMEOUT_S} if (
        sig == signal.SIGSTOP and state == "Scheduling"
    ) else {}
    job = jobs.new(fault, state, **config)
    victims: list[int] = []
    try:
        st = await job.enter(state)
        victim = job.runner_pid(st)
        victims.append(victim)
        signal_runner(victim, job.job_id, sig)
        job.fault_injected(st)
        path, end = EXPECTED[state]
        after = await job.outcome(path, end=end)
        assert victim not in {r.pid for r in after.runners}
        if state == "Rescaling":  # the rescale still happens, through recovery
            assert set(after.parallelism.values()) == {RESCALE_TO}, after.parallelism
        await job.finish()
    finally:
        release_stopped(victims, job.job_id)
        await job.cleanup()


def _matrix(jobs: JobFactory, request: pytest.FixtureRequest, fault: str, sig: signal.Signals) -> Awaitable[Matrix]:
    states = selected(request, list(STATES))
    return run_matrix({state: (lambda s=state: _case(jobs, fault, s, sig)) for state in states})


@pytest_asyncio.fixture(scope="module")
async def sigkill(jobs: JobFactory, request: pytest.FixtureRequest) -> Matrix:
    return await _matrix(jobs, request, "runner SIGKILL", signal.SIGKILL)


@pytest_asyncio.fixture(scope="module")
async def sigstop(jobs: JobFactory, request: pytest.FixtureRequest) -> Matrix:
    return await _matrix(jobs, request, "runner SIGSTOP", signal.SIGSTOP)


@pytest.mark.parametrize("case", STATES)
def test_runner_sigkill(sigkill: Matrix, case: str) -> None:
    sigkill.check(case)


@pytest.mark.parametrize("case", STATES)
def test_runner_sigstop(sigstop: Matrix, case: str) -> None:
    sigstop.check(case)

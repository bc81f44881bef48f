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
from collections.abc import Callable

import pytest

from tests.faults.harness import RECOVERS, RESCALE_TO, RUNS_ON, STATES, FaultJob, release_stopped, signal_runner

pytestmark = pytest.mark.slow

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
# the start activity's 3 attempts waits this long), so it is short in that case.
STOPPED_RUNNER_START_TIMEOUT_S = 5.0


async def _case(make_job: Callable[..., FaultJob], fault: str, state: str, sig: signal.Signals) -> None:
    config = {"task_startup_timeout_s": STOPPED_RUNNER_START_TIMEOUT_S} if (
        sig == signal.SIGSTOP and state == "Scheduling"
    ) else {}
    job = make_job(fault, f"f-{fault}-{state.lower()}", **config)
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


@pytest.mark.parametrize("state", STATES)
async def test_runner_sigkill(make_job: Callable[..., FaultJob], state: str) -> None:
    await _case(make_job, "runner SIGKILL", state, signal.SIGKILL)


@pytest.mark.parametrize("state", STATES)
async def test_runner_sigstop(make_job: Callable[..., FaultJob], state: str) -> None:
    await _case(make_job, "runner SIGSTOP", state, signal.SIGSTOP)

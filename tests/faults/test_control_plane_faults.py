"""The control plane fails under jobs in every state: the controller worker is killed (SIGKILL),
or the Temporal server is killed (SIGKILL) and restarted on the same database.

One crash hits every state at once, as it would in production: eight jobs are brought into the
eight states (held there by their control files), then the controller worker (a `sluice worker`
process) or the dev server (its own, with its SQLite file) is killed, a new one is started, and
each job is followed on its own. Expected (docs/lifecycle.md): nothing about the job changes.
Runners do not depend on the controller; activities of the dead worker are retried on the new one
once their heartbeat timeout (10 s) passes, and barrier injection, the manifest and the commit
are idempotent per epoch. So every job goes on the way it was going: Scheduling reaches Running,
Running keeps its generation and checkpoints again, a checkpoint in flight completes, a stop
ends Stopped, a rescale, restart or recovery reaches Running, all without a transition the fault
caused (no Recovering). Output is exactly-once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from sluice.client import JobClient, connect
from sluice.devserver import DevServer
from sluice.models import JobStatus
from tests.conftest import ManagedProcess, run_process_worker
from tests.e2e_helpers import describe_status
from tests.faults.harness import RUNS_ON, STATES, FaultJob, now_utc
from tests.faults.matrix import MATRIX_TIMEOUT_S, JobFactory, Matrix

pytestmark = [pytest.mark.slow, pytest.mark.timeout(MATRIX_TIMEOUT_S)]

# After the crash: the path each job was on anyway. None: it stays where it is (and must
# complete a checkpoint).
EXPECTED: dict[str, tuple[list[str], str | tuple[str, ...]] | None] = {
    "Scheduling": (["Running"], RUNS_ON),
    "Running": None,
    "Checkpoint": None,
    "CheckpointStopping": (["Stopped"], "Stopped"),
    "Stopping": (["Stopped"], "Stopped"),
    "Rescaling": (["Scheduling", "Running"], RUNS_ON),
    "Restarting": (["Scheduling", "Running"], RUNS_ON),
    "Recovering": (["Compiling", "Scheduling", "Running"], RUNS_ON),
}
# The jobs wait in their held states until every one of them is ready, so every timeout that
# could end a hold is long here; one runner per job keeps eight jobs light.
HELD_CONFIG: dict[str, Any] = {
    "slots_per_runner": 4,
    "task_startup_timeout_s": 180.0,  # above HOLD_OPEN_MAX_S: the held start never times out
    "finish_timeout_s": 90.0,
    # The holds block one map call until released (all jobs wait for the last one to be ready):
    # longer than any hold here, so a held call is not taken for a hang.
    "task_hang_timeout_s": 150.0,
}
# Running is not held, and Recovering passes within seconds: they are entered last. The Running
# job's source runs longer, so that it still runs when the crash comes.
LATE_GROUPS = [["Running", "Checkpoint"], ["Recovering"]]
LATE = {s for group in LATE_GROUPS for s in group}
DEFAULT_LIMIT = 300
LIMITS = {"Running": 1500}
SERVER_DOWN_S = 1.0  # the server stays dead this long before it is restarted
WORKER_READY_S = 2.0  # a replaced `sluice worker` process needs about this to poll again


async def _follow(job: FaultJob) -> None:
    """After the crash: the job goes on as it was going, then finishes exactly once."""
    expected = EXPECTED[job.state]
    if expected is None:
        await job.continues()
    else:
        path, end = expected
        await job.outcome(path, end=end)
    before = await job.status()
    done = await job.finish()
    assert job.fault_time is not None
    # Nothing the crash caused, later either: no recovery in this run after the crash (a resumed
    # Stopped job is a new run, whose record starts afresh).
    for st in (before, done):
        assert "Recovering" not in job.after_fault(st), (
            f"{job.fault} in {job.state}: the job recovered after the crash: {describe_status(st)}"
        )


async def _crash_in_every_state(
    fault: str,
    server: DevServer,
    fault_root: Path,
    work_dir: Path,
    crash: Callable[[ManagedProcess], Awaitable[ManagedProcess]],
) -> Matrix:
    """Bring a job into each state, `crash(worker)` (returns the worker to use afterwards), follow
    each job. Failures are kept per state."""
    client = await connect(server.address, "default")
    job_client = JobClient(client)
    state_dir = work_dir / "controller"
    worker = run_process_worker(server.address, state_dir)
    factory = JobFactory(job_client, fault_root, work_dir)
    jobs = {
        s: factory.new(fault, s, client=job_client, limit=LIMITS.get(s, DEFAULT_LIMIT), **HELD_CONFIG)
        for s in STATES
    }
    for job in jobs.values():
        job.block_holds = True
    matrix = Matrix()
    ready: dict[str, JobStatus] = {}

    async def enter(states: list[str]) -> None:
        entered = await asyncio.gather(*(jobs[s].enter(s) for s in states), return_exceptions=True)
        for s, st in zip(states, entered):
            if isinstance(st, BaseException):
                matrix.failures[s] = st
            else:
                ready[s] = st

    try:
        # Held states first (they wait for the others); then the states that pass by themselves:
        # Running and a checkpoint in flight, and last Recovering, right before the crash.
        await enter([s for s in STATES if s not in LATE])
        for group in LATE_GROUPS:
            await enter(group)
        # Each job's status right before the crash: where the crash meets it (by position in its
        # transition record, see FaultJob.fault_by_position).
        ready = dict(zip(ready, await asyncio.gather(*(jobs[s].status() for s in ready))))
        crashed_at = now_utc()
        worker = await crash(worker)
        for s, st in ready.items():
            jobs[s].fault_by_position = True
            jobs[s].fault_injected(st, at=crashed_at)  # the fault is the crash, not the restart
        results = await asyncio.gather(*(_follow(jobs[s]) for s in ready), return_exceptions=True)
        for s, res in zip(ready, results):
            matrix.failures[s] = res if isinstance(res, BaseException) else None
    finally:
        for job in jobs.values():
            await job.cleanup()
        worker.stop()
    return matrix


@pytest_asyncio.fixture(scope="module")
async def controller_killed(
    dev_server_factory: Callable[..., DevServer], fault_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Matrix:
    server = dev_server_factory()
    work_dir = tmp_path_factory.mktemp("controller-killed")

    async def crash(worker: ManagedProcess) -> ManagedProcess:
        worker.kill()  # SIGKILL: no chance to clean anything up
        replacement = run_process_worker(server.address, work_dir / "controller")
        await asyncio.sleep(WORKER_READY_S)
        return replacement

    try:
        return await _crash_in_every_state("controller SIGKILL", server, fault_root, work_dir, crash)
    finally:
        server.stop()


@pytest_asyncio.fixture(scope="module")
async def server_killed(
    dev_server_factory: Callable[..., DevServer], fault_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Matrix:
    server = dev_server_factory()
    work_dir = tmp_path_factory.mktemp("server-killed")

    async def crash(worker: ManagedProcess) -> ManagedProcess:
        assert server.pid is not None and server.running()
        os.kill(server.pid, signal.SIGKILL)  # the server this test started, by its PID
        await asyncio.to_thread(server.stop)  # reaps it (already dead) and closes its log
        await asyncio.sleep(SERVER_DOWN_S)
        await server.astart()  # same port, same SQLite file
        return worker

    try:
        return await _crash_in_every_state("Temporal server SIGKILL", server, fault_root, work_dir, crash)
    finally:
        server.stop()


@pytest.mark.parametrize("case", STATES)
def test_controller_worker_sigkill(controller_killed: Matrix, case: str) -> None:
    controller_killed.check(case)


@pytest.mark.parametrize("case", STATES)
def test_temporal_server_sigkill(server_killed: Matrix, case: str) -> None:
    server_killed.check(case)

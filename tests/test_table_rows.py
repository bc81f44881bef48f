"""Every row of the transition table (sluice/workflows/table.py), driven against the real
JobWorkflow with mocked activities on Temporal's time-skipping test server (no runners).

One case per row of `TRANSITIONS`: its driver takes a job into the row's source state, causes
the row's trigger (a command, a fake monitor report, a fake activity that fails or is held),
and says which reason the transition must give and where the job must settle. The test then
checks that the first transition out of the source state after the trigger is exactly the row's
(`status().transitions`), that the job really was in the target state afterwards, and the state
it settled in. A row without a driver must be in NOT_DRIVABLE with a reason, else
`test_every_row_is_driven_or_not_drivable` fails: a new row in the table needs a test here.

Rows whose trigger is a controller error (an unexpected exception in a state's step, i.e. a
bug) are driven by injecting one: the source state's step is replaced by one that raises.

Time is locked (no skipping) while the test polls with queries; nothing here waits on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle, WorkflowUpdateStage
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from sluice.hosts.contracts import SIGNAL_RUNNER_REPORT, RunnerReport
from sluice.models import (
    CheckpointInput,
    JobConfig,
    JobInput,
    JobSpec,
    JobStatus,
    MonitorResult,
    PatchRequest,
    PipelineSpec,
    RestartCommand,
    TransitionRecord,
    UpgradeRequest,
)
from sluice.workflows.constants import USER_ERROR_TYPE
from sluice.workflows.job import JobWorkflow
from sluice.workflows.states import STEPS
from sluice.workflows.table import CONTROLLER_ERROR, TERMINAL, TRANSITIONS, Transition
from tests.fake_controller import FakeController
from tests.time_skipping import time_skipping_env

pytestmark = pytest.mark.timeout(60)

WAIT_S = 20.0  # real seconds any one wait may take (each takes milliseconds when all is well)
POLL_S = 0.02
PIPELINE = PipelineSpec.model_validate(
    {"name": "rows", "operators": [{"id": "events", "type": "generator"},
                                   {"id": "m", "type": "filter", "expr": "value > 1"},
                                   {"id": "out", "type": "null"}]}
)  # fmt: skip

Row = tuple[str, str]

# Rows no driver here can take, each with the reason. Empty: every row is driven.
NOT_DRIVABLE: dict[Row, str] = {}


# ------------------------------------------------------------------ the job under test


@dataclass
class Expect:
    """What the row's transition must look like and where the job must end up after it."""

    reason: str | tuple[str, ...]  # fragments of the transition's recorded reason
    settles: str  # the state the job then stays in (terminal, or Running of a new generation)
    generation: int | None = None  # of the settled job, when it matters
    check: Callable[[Job, JobStatus], None] | None = None  # anything else to check once settled


@dataclass
class Job:
    env: WorkflowEnvironment
    fake: FakeController
    handle: WorkflowHandle[Any, Any]
    mark: int = 0  # transitions recorded before the trigger: the row's is the first after it

    async def status(self) -> JobStatus:
        return await self.handle.query("status", result_type=JobStatus)

    async def until(self, check: Callable[[JobStatus], bool], what: str) -> JobStatus:
        deadline = time.monotonic() + WAIT_S
        status = await self.status()
        while not check(status):
            if time.monotonic() > deadline:
                raise AssertionError(f"job never {what}; it is {status.state}: {_path(status.transitions)}")
            await asyncio.sleep(POLL_S)
            status = await self.status()
        return status

    async def reach(self, state: str) -> JobStatus:
        """Wait until the job is in `state`; the trigger comes next (the mark is set here)."""
        status = await self.until(lambda s: s.state == state, f"reached {state}")
        self.mark = len(status.transitions)
        return status

    async def held(self, prefix: str) -> None:
        """Wait until a fake activity whose name starts with `prefix` is held."""
        deadline = time.monotonic() + WAIT_S
        while not any(h.startswith(prefix) for h in self.fake.held):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {prefix!r} activity was ever held (held: {self.fake.held})")
            await asyncio.sleep(POLL_S)

    async def stop(self, mode: str) -> None:
        """Signal a stop and wait until the job recorded it (before anything is released)."""
        await self.handle.signal("stop", {"mode": mode})
        await self.until(lambda s: s.config.stop == mode, f"recorded stop {mode}")

    async def patch(self, **request: Any) -> JobStatus:
        return await self.handle.execute_update("patch", PatchRequest(**request), result_type=JobStatus)


@dataclass
class Lab:
    """Starts jobs for one test, each on its own worker and task queue; cleans up after it."""

    env: WorkflowEnvironment
    monkeypatch: pytest.MonkeyPatch
    stack: contextlib.AsyncExitStack
    jobs: list[Job] = field(default_factory=list)

    async def start(self, fake: FakeController, start_signal: str | None = None,
                    start_signal_args: list[Any] | None = None, **config: Any) -> Job:  # fmt: skip
        queue = f"rows-{uuid.uuid4().hex[:8]}"
        job_id = f"job-{uuid.uuid4().hex[:8]}"
        worker = Worker(self.env.client, task_queue=queue, workflows=[JobWorkflow], activities=fake.activities())
        await self.stack.enter_async_context(worker)
        spec = JobSpec(job_id=job_id, pipeline=PIPELINE, config=JobConfig(**config))
        extra: dict[str, Any] = {}
        if start_signal is not None:
            extra = {"start_signal": start_signal, "start_signal_args": start_signal_args or []}
        handle = await self.env.client.start_workflow(
            JobWorkflow.run, JobInput(spec=spec).model_dump(mode="json"), id=job_id, task_queue=queue, **extra
        )
        job = Job(self.env, fake, handle)
        self.jobs.append(job)
        return job

    async def own_server(self) -> None:
        """Jobs started from now on run on a test server of their own: tests that skip time need
        it. The shared server's clock may no longer skip: it keeps a time-skipping lock for every
        activity that was still running when its workflow closed (a held fake activity that the
        job abandoned, e.g. a final checkpoint escalated to a stop), so its time only runs."""
        self.env = await self.stack.enter_async_context(time_skipping_env(search_attributes=True))

    def inject_controller_error(self, state: str) -> None:
        """A bug in `state`'s step: it raises instead of doing its work (for this test only)."""

        async def broken(wf: Any) -> None:
            raise RuntimeError(f"injected bug in the {state} step")

        self.monkeypatch.setitem(STEPS, state, broken)

    async def close(self) -> None:
        for job in self.jobs:
            job.fake.release()
            with contextlib.suppress(Exception):
                if (await job.handle.describe()).status == WorkflowExecutionStatus.RUNNING:
                    await job.handle.terminate("test over")


Driver = Callable[[Lab], Awaitable[tuple[Job, Expect]]]
DRIVERS: dict[Row, Driver] = {}


def drives(source: str, target: str) -> Callable[[Driver], Driver]:
    def register(driver: Driver) -> Driver:
        assert (source, target) not in DRIVERS, f"two drivers for {source}->{target}"
        DRIVERS[(source, target)] = driver
        return driver

    return register


# ------------------------------------------------------------------ fakes' answers


def _lost(generation: int, upto: int = 1) -> Callable[[int], MonitorResult | None]:
    """Generations up to `upto` lose a runner; later ones run."""
    return lambda g: MonitorResult(kind="runner_lost", message=f"runner g{g}-r0 exited") if g <= upto else None


def _finished_first(g: int) -> MonitorResult | None:
    return MonitorResult(kind="sources_finished", message="every source reached its end") if g == 1 else None


def _final_checkpoint_of_generation_1(inp: CheckpointInput) -> bool:
    return inp.then_stop and inp.generation == 1


def _fails_final_checkpoint(inp: CheckpointInput) -> BaseException | None:
    if _final_checkpoint_of_generation_1(inp):
        return ApplicationError(f"store refused epoch {inp.epoch}", type="StoreRefused", non_retryable=True)
    return None


def _internal(message: str) -> ApplicationError:
    return ApplicationError(message, type="Unavailable", non_retryable=True)  # no retries: no backoff


def _user_error(message: str) -> ApplicationError:
    return ApplicationError(message, type=USER_ERROR_TYPE, non_retryable=True)


async def _running(lab: Lab, fake: FakeController | None = None, **config: Any) -> Job:
    job = await lab.start(fake or FakeController(), **config)
    await job.reach("Running")
    return job


# ------------------------------------------------------------------ Created, Compiling


@drives("Created", "Compiling")
async def _created_compiling(lab: Lab) -> tuple[Job, Expect]:
    return await lab.start(FakeController()), Expect("job created", "Running", generation=1)


@drives("Compiling", "Scheduling")
async def _compiling_scheduling(lab: Lab) -> tuple[Job, Expect]:
    return await lab.start(FakeController()), Expect("program valid", "Running", generation=1)


@drives("Compiling", "Failing")
async def _compiling_failing(lab: Lab) -> tuple[Job, Expect]:
    fake = FakeController(compile_error=lambda n: _user_error("operator 'm': unknown column 'valeu'"))
    return await lab.start(fake), Expect(("program invalid: ", "operator 'm': unknown column 'valeu'"), "Failed")


@drives("Compiling", "Recovering")
async def _compiling_recovering(lab: Lab) -> tuple[Job, Expect]:
    fake = FakeController(compile_error=lambda n: _internal("checkpoint store unreachable") if n == 1 else None)
    return await lab.start(fake), Expect(("compile failed: ", "checkpoint store unreachable"), "Running", 1)


@drives("Compiling", "Stopping")
async def _compiling_stopping(lab: Lab) -> tuple[Job, Expect]:
    # The stop arrives with the start: the job sees it in its first workflow task.
    job = await lab.start(FakeController(), start_signal="stop", start_signal_args=[{"mode": "immediate"}])
    return job, Expect("stop immediate requested before scheduling", "Stopped")


# ------------------------------------------------------------------ Scheduling


@drives("Scheduling", "Running")
async def _scheduling_running(lab: Lab) -> tuple[Job, Expect]:
    return await lab.start(FakeController()), Expect("all subtasks started", "Running", generation=1)


@drives("Scheduling", "Stopping")
async def _scheduling_stopping(lab: Lab) -> tuple[Job, Expect]:
    job = await lab.start(FakeController(place_waiting=lambda g: "every host is full"))
    await job.reach("Scheduling")
    await job.until(lambda s: s.waiting_for is not None, "waited for runner slots")
    await job.stop("immediate")
    return job, Expect("stop immediate requested while waiting for runner slots", "Stopped")


@drives("Scheduling", "Recovering")
async def _scheduling_recovering(lab: Lab) -> tuple[Job, Expect]:
    fake = FakeController(start_error=lambda g: _internal("runner g1-r0 refused the plan") if g == 1 else None)
    return await lab.start(fake), Expect(("tasks did not start: ", "runner g1-r0 refused the plan"), "Running", 2)


@drives("Scheduling", "Failing")
async def _scheduling_failing(lab: Lab) -> tuple[Job, Expect]:
    fake = FakeController(start_error=lambda g: _user_error("operator 'm' cannot open its lookup table"))
    return await lab.start(fake), Expect(("task failed (not retryable): ", "operator 'm' cannot open"), "Failed")


# ------------------------------------------------------------------ Running


@drives("Running", "CheckpointStopping")
async def _running_checkpoint_stopping(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    await job.stop("checkpoint")
    return job, Expect("stop checkpoint requested", "Stopped")


@drives("Running", "Stopping")
async def _running_stopping(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    await job.stop("graceful")
    return job, Expect("stop graceful requested", "Stopped")


@drives("Running", "Restarting")
async def _running_restarting(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    await job.patch(restart=RestartCommand())
    return job, Expect("restart requested (safe)", "Running", generation=2)


@drives("Running", "Rescaling")
async def _running_rescaling(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    await job.patch(parallelism=2)
    return job, Expect("parallelism changed to {'events': 2, 'm': 2, 'out': 2}", "Running", generation=2)


@drives("Running", "Finishing")
async def _running_finishing(lab: Lab) -> tuple[Job, Expect]:
    # The host reports every task finished (sent while the runners start; acted on in Running).
    job = await lab.start(FakeController(monitor=_finished_first))
    return job, Expect("all sources finished", "Finished")


@drives("Running", "Recovering")
async def _running_recovering(lab: Lab) -> tuple[Job, Expect]:
    job = await lab.start(FakeController(monitor=_lost(1)))
    return job, Expect("runner lost: runner g1-r0 exited", "Running", generation=2)


@drives("Running", "Failing")
async def _running_failing(lab: Lab) -> tuple[Job, Expect]:
    failed = MonitorResult(kind="task_failed", message="operator 'm' raised KeyError", retryable=False,
                           domain="user", operator="m")  # fmt: skip
    job = await lab.start(FakeController(monitor=lambda g: failed))
    return job, Expect("task failed (not retryable): operator 'm' raised KeyError", "Failed")


# ------------------------------------------------------------------ CheckpointStopping, Stopping


@drives("CheckpointStopping", "Stopped")
async def _checkpoint_stopping_stopped(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    await job.stop("checkpoint")
    return job, Expect("final checkpoint epoch 1 committed, all tasks finished", "Stopped")


@drives("CheckpointStopping", "Stopping")
async def _checkpoint_stopping_stopping(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab, FakeController(hold_checkpoint=lambda inp: inp.then_stop))
    await job.stop("checkpoint")
    await job.reach("CheckpointStopping")
    await job.held("checkpoint 1 then stop")
    await job.stop("immediate")  # escalates while the final checkpoint is in flight
    return job, Expect("stop immediate requested during the final checkpoint", "Stopped")


@drives("Stopping", "Stopped")
async def _stopping_stopped(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    await job.stop("graceful")
    return job, Expect("stop graceful: all tasks finished", "Stopped")


# ------------------------------------------------------------------ Finishing


@drives("Finishing", "Finished")
async def _finishing_finished(lab: Lab) -> tuple[Job, Expect]:
    job = await lab.start(FakeController(monitor=_finished_first))
    return job, Expect("final checkpoint epoch 1 committed, all tasks finished", "Finished")


@drives("Finishing", "Stopping")
async def _finishing_stopping(lab: Lab) -> tuple[Job, Expect]:
    job = await lab.start(FakeController(monitor=_finished_first, hold_checkpoint=lambda inp: inp.then_stop))
    await job.reach("Finishing")
    await job.held("checkpoint 1 then stop")
    await job.stop("immediate")
    return job, Expect("stop immediate requested while finishing", "Stopped")


@drives("Finishing", "Recovering")
async def _finishing_recovering(lab: Lab) -> tuple[Job, Expect]:
    fake = FakeController(monitor=_finished_first, hold_checkpoint=_final_checkpoint_of_generation_1,
                          checkpoint_error=_fails_final_checkpoint)  # fmt: skip
    job = await lab.start(fake)
    await job.reach("Finishing")
    await job.held("checkpoint 1 then stop")
    fake.release()
    return job, Expect(("checkpoint failed: ", "store refused epoch 1"), "Running", generation=2)


# ------------------------------------------------------------------ Rescaling, Restarting


async def _in_final_checkpoint(lab: Lab, state: str, fake: FakeController) -> Job:
    """A Running job told to rescale or restart, held in its final checkpoint in `state`."""
    job = await _running(lab, fake)
    if state == "Rescaling":
        await job.patch(parallelism=2)
    else:
        await job.patch(restart=RestartCommand())
    await job.reach(state)
    await job.held("checkpoint 1 then stop")
    return job


@drives("Rescaling", "Scheduling")
async def _rescaling_scheduling(lab: Lab) -> tuple[Job, Expect]:
    job = await _in_final_checkpoint(lab, "Rescaling", FakeController(hold_checkpoint=lambda inp: inp.then_stop))
    job.fake.release()
    return job, Expect("rescaling to {'events': 2, 'm': 2, 'out': 2}: final checkpoint epoch 1 done", "Running", 2)


@drives("Restarting", "Scheduling")
async def _restarting_scheduling(lab: Lab) -> tuple[Job, Expect]:
    job = await _in_final_checkpoint(lab, "Restarting", FakeController(hold_checkpoint=lambda inp: inp.then_stop))
    job.fake.release()
    return job, Expect("safe restart: final checkpoint epoch 1 done", "Running", generation=2)


@drives("Rescaling", "Stopping")
async def _rescaling_stopping(lab: Lab) -> tuple[Job, Expect]:
    job = await _in_final_checkpoint(lab, "Rescaling", FakeController(hold_checkpoint=lambda inp: inp.then_stop))
    await job.stop("graceful")
    return job, Expect("stop graceful requested during rescaling", "Stopped")


@drives("Restarting", "Stopping")
async def _restarting_stopping(lab: Lab) -> tuple[Job, Expect]:
    job = await _in_final_checkpoint(lab, "Restarting", FakeController(hold_checkpoint=lambda inp: inp.then_stop))
    await job.stop("graceful")
    return job, Expect("stop graceful requested during safe restart", "Stopped")


@drives("Rescaling", "Recovering")
async def _rescaling_recovering(lab: Lab) -> tuple[Job, Expect]:
    fake = FakeController(hold_checkpoint=_final_checkpoint_of_generation_1, checkpoint_error=_fails_final_checkpoint)
    job = await _in_final_checkpoint(lab, "Rescaling", fake)
    fake.release()
    return job, Expect(("rescaling to {'events': 2, 'm': 2, 'out': 2}: checkpoint failed: ", "store refused epoch 1"),
                       "Running", generation=2)  # fmt: skip


@drives("Restarting", "Recovering")
async def _restarting_recovering(lab: Lab) -> tuple[Job, Expect]:
    fake = FakeController(hold_checkpoint=_final_checkpoint_of_generation_1, checkpoint_error=_fails_final_checkpoint)
    job = await _in_final_checkpoint(lab, "Restarting", fake)
    fake.release()
    return job, Expect(("safe restart: checkpoint failed: ", "store refused epoch 1"), "Running", 2)


# ------------------------------------------------------------------ Recovering, Failing


@drives("Recovering", "Compiling")
async def _recovering_compiling(lab: Lab) -> tuple[Job, Expect]:
    return await lab.start(FakeController(monitor=_lost(1))), Expect("restart 1 at once", "Running", generation=2)


@drives("Recovering", "Failing")
async def _recovering_failing(lab: Lab) -> tuple[Job, Expect]:
    job = await lab.start(FakeController(monitor=_lost(1)), allowed_restarts=0)
    return job, Expect("exhausted 0 allowed restarts; last error: runner g1-r0 exited", "Failed")


@drives("Recovering", "Stopping")
async def _recovering_stopping(lab: Lab) -> tuple[Job, Expect]:
    # A compile held until a stop was recorded, then failing: Recovering finds the stop waiting.
    fake = FakeController(hold_compile=lambda n: n == 1, compile_error=lambda n: _internal("store unreachable"))
    job = await lab.start(fake)
    await job.held("compile 1")
    await job.stop("immediate")
    fake.release()
    return job, Expect("stop immediate requested while recovering", "Stopped")


# ------------------------------------------------------------------ Upgrading

UPGRADED = PipelineSpec.model_validate(
    {"name": "rows", "operators": [{"id": "events", "type": "generator"},
                                   {"id": "m", "type": "filter", "expr": "value > 1"},
                                   {"id": "m2", "type": "filter", "expr": "value > 2"},
                                   {"id": "out", "type": "null"}]}
)  # fmt: skip


async def _upgrade(job: Job) -> None:
    """Ask for an upgrade to UPGRADED (no health window); returns once the job accepted it."""
    await job.handle.start_update(
        "upgrade", UpgradeRequest(pipeline=UPGRADED, health_window_s=0.0),
        wait_for_stage=WorkflowUpdateStage.ACCEPTED,
    )  # fmt: skip


def _upgraded(job: Job, status: JobStatus) -> None:
    assert "m2" in status.parallelism and status.upgrade is not None, status.upgrade


def _rolled_back(job: Job, status: JobStatus) -> None:
    assert "m2" not in status.parallelism, status.parallelism
    assert status.upgrade is not None and status.upgrade.phase == "rolled_back", status.upgrade


def _starts_fail_from(generation: int) -> Callable[[int], BaseException | None]:
    return lambda g: _internal(f"runner g{g}-r0 refused the plan") if g == generation else None


async def _in_upgrade_savepoint(lab: Lab, fake: FakeController) -> Job:
    """A job in Upgrading, its then-stop savepoint held (the fake must hold it)."""
    job = await _running(lab, fake)
    await _upgrade(job)
    await job.reach("Upgrading")
    await job.held("checkpoint")
    return job


@drives("Running", "Upgrading")
async def _running_upgrading(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    await _upgrade(job)
    return job, Expect("upgrade 1 to pipeline version", "Running", generation=2, check=_upgraded)


@drives("Scheduling", "Upgrading")
async def _scheduling_upgrading(lab: Lab) -> tuple[Job, Expect]:
    fake = FakeController(start_error=_starts_fail_from(2), hold_start=lambda g: g == 2)
    job = await _running(lab, fake)
    await _upgrade(job)
    await job.held("start 2")
    await job.reach("Scheduling")
    fake.release()
    return job, Expect(("rollback of upgrade 1", "runner g2-r0 refused the plan"), "Running", generation=3,
                       check=_rolled_back)  # fmt: skip


@drives("Upgrading", "Scheduling")
async def _upgrading_scheduling(lab: Lab) -> tuple[Job, Expect]:
    fake = FakeController(hold_checkpoint=_final_checkpoint_of_generation_1)
    job = await _in_upgrade_savepoint(lab, fake)
    fake.release()
    return job, Expect("upgrade 1: pipeline version", "Running", generation=2, check=_upgraded)


@drives("Upgrading", "Stopping")
async def _upgrading_stopping(lab: Lab) -> tuple[Job, Expect]:
    job = await _in_upgrade_savepoint(lab, FakeController(hold_checkpoint=_final_checkpoint_of_generation_1))
    await job.stop("immediate")
    return job, Expect("stop immediate requested during upgrade 1", "Stopped")


@drives("Upgrading", "Recovering")
async def _upgrading_recovering(lab: Lab) -> tuple[Job, Expect]:
    fake = FakeController(hold_checkpoint=_final_checkpoint_of_generation_1, checkpoint_error=_fails_final_checkpoint)
    job = await _in_upgrade_savepoint(lab, fake)
    fake.release()
    return job, Expect(("upgrade 1: savepoint failed", "store refused epoch"), "Running", generation=2)


@drives("Upgrading", "Failing")
async def _upgrading_failing(lab: Lab) -> tuple[Job, Expect]:
    # The new generation fails to start; the rollback's compile of the old pipeline (compile 3:
    # the first start, the switch, the rollback) is a user error: nothing left to run.
    fake = FakeController(start_error=_starts_fail_from(2), hold_compile=lambda n: n == 3,
                          compile_error=lambda n: _user_error("operator 'm': unknown column") if n == 3 else None)
    job = await _running(lab, fake)
    await _upgrade(job)
    await job.held("compile 3")
    await job.reach("Upgrading")  # the rollback's
    fake.release()
    return job, Expect(("program invalid: ", "operator 'm': unknown column"), "Failed")


@drives("Failing", "Failed")
async def _failing_failed(lab: Lab) -> tuple[Job, Expect]:
    fake = FakeController(compile_error=lambda n: _user_error("no such operator type 'filtr'"))
    job = await lab.start(fake)
    return job, Expect("no such operator type 'filtr'", "Failed")


# ------------------------------------------------------------------ controller errors


def _controller_error(state: str) -> Expect:
    return Expect(f"controller error in {state}: RuntimeError: injected bug in the {state} step", "Failed")


@drives("Created", "Failing")
async def _created_controller_error(lab: Lab) -> tuple[Job, Expect]:
    lab.inject_controller_error("Created")
    return await lab.start(FakeController()), _controller_error("Created")


@drives("Rescaling", "Failing")
async def _rescaling_controller_error(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    lab.inject_controller_error("Rescaling")
    await job.patch(parallelism=2)
    return job, _controller_error("Rescaling")


@drives("Restarting", "Failing")
async def _restarting_controller_error(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    lab.inject_controller_error("Restarting")
    await job.patch(restart=RestartCommand(force=True))
    return job, _controller_error("Restarting")


@drives("CheckpointStopping", "Failing")
async def _checkpoint_stopping_controller_error(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    lab.inject_controller_error("CheckpointStopping")
    await job.stop("checkpoint")
    return job, _controller_error("CheckpointStopping")


@drives("Stopping", "Failing")
async def _stopping_controller_error(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    lab.inject_controller_error("Stopping")
    await job.stop("graceful")
    return job, _controller_error("Stopping")


@drives("Finishing", "Failing")
async def _finishing_controller_error(lab: Lab) -> tuple[Job, Expect]:
    lab.inject_controller_error("Finishing")
    return await lab.start(FakeController(monitor=_finished_first)), _controller_error("Finishing")


# ------------------------------------------------------------------ other triggers of some rows
# A row may name several triggers; each driver above causes one. These cause the others.

ALTERNATIVES: dict[str, tuple[Row, Driver]] = {}


def also_drives(source: str, target: str, trigger: str) -> Callable[[Driver], Driver]:
    def register(driver: Driver) -> Driver:
        name = f"{source}->{target} ({trigger})"
        assert name not in ALTERNATIVES, name
        ALTERNATIVES[name] = ((source, target), driver)
        return driver

    return register


def _report(job: Job, kind: str, **fields: Any) -> RunnerReport:
    return RunnerReport(job_id=job.handle.id, generation=1, runner_id="g1-r0", host_id="fake-host",
                        kind=kind, **fields)  # type: ignore[arg-type]  # fmt: skip


def _no_stop_activity(job: Job, status: JobStatus) -> None:
    assert job.fake.stop_modes == [], job.fake.stop_modes  # force: runners killed, not asked to stop


@also_drives("Scheduling", "Stopping", "stop force")
async def _scheduling_stopping_force(lab: Lab) -> tuple[Job, Expect]:
    job = await lab.start(FakeController(place_waiting=lambda g: "every host is full"))
    await job.until(lambda s: s.waiting_for is not None, "waited for runner slots")
    job.mark = len((await job.status()).transitions)
    await job.stop("force")
    return job, Expect("stop force requested while waiting for runner slots", "Stopped", check=_no_stop_activity)


@also_drives("Running", "Stopping", "stop immediate")
async def _running_stopping_immediate(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    await job.stop("immediate")

    def asked_immediate(job: Job, status: JobStatus) -> None:
        assert job.fake.stop_modes == ["immediate"], job.fake.stop_modes

    return job, Expect("stop immediate requested", "Stopped", check=asked_immediate)


@also_drives("Running", "Stopping", "stop force")
async def _running_stopping_force(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    await job.stop("force")
    return job, Expect("stop force requested", "Stopped", check=_no_stop_activity)


@also_drives("Running", "Stopping", "TTL expired")
async def _running_stopping_ttl(lab: Lab) -> tuple[Job, Expect]:
    await lab.own_server()
    job = await _running(lab)
    await job.patch(ttl_s=35)
    await job.env.sleep(36)  # skipped: the TTL's time (and 3 periodic checkpoints) passes at once

    def checkpointed(job: Job, status: JobStatus) -> None:
        assert job.fake.checkpoints == [1, 2, 3] and status.epoch == 3, (job.fake.checkpoints, status.epoch)

    return job, Expect("TTL of 35 s expired", "Stopped", check=checkpointed)


@also_drives("Running", "Recovering", "task failed (retryable)")
async def _running_recovering_task_failed(lab: Lab) -> tuple[Job, Expect]:
    failed = MonitorResult(kind="task_failed", message="operator 'm' raised TimeoutError", operator="m")
    job = await lab.start(FakeController(monitor=lambda g: failed if g == 1 else None))
    return job, Expect("task failed: operator 'm' raised TimeoutError", "Running", generation=2)


@also_drives("Running", "Recovering", "periodic checkpoint failed")
async def _running_recovering_checkpoint_failed(lab: Lab) -> tuple[Job, Expect]:
    def refused(inp: CheckpointInput) -> BaseException | None:
        return _internal(f"store refused epoch {inp.epoch}") if inp.generation == 1 else None

    await lab.own_server()
    job = await _running(lab, FakeController(checkpoint_error=refused), checkpoint_interval_s=60)
    await job.env.sleep(61)  # skipped: the first periodic checkpoint is due
    return job, Expect(("checkpoint failed: ", "store refused epoch 1"), "Running", generation=2)


@also_drives("CheckpointStopping", "Stopping", "final checkpoint failed")
async def _checkpoint_stopping_failed(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab, FakeController(checkpoint_error=_fails_final_checkpoint))
    await job.stop("checkpoint")
    return job, Expect(("store refused epoch 1", "killing runners (restore point stays epoch 0)"), "Stopped",
                       check=_no_stop_activity)  # fmt: skip


@also_drives("Stopping", "Stopped", "finish timeout, runners killed")
async def _stopping_stopped_killed(lab: Lab) -> tuple[Job, Expect]:
    fake = FakeController(stop_error=lambda inp: _internal("tasks still busy after the finish timeout"))
    job = await _running(lab, fake)
    await job.stop("graceful")
    return job, Expect(("stop graceful did not finish", "runners killed"), "Stopped")


@also_drives("Finishing", "Recovering", "task failed during the final checkpoint")
async def _finishing_recovering_task_failed(lab: Lab) -> tuple[Job, Expect]:
    job = await lab.start(FakeController(monitor=_finished_first, hold_checkpoint=_final_checkpoint_of_generation_1))
    await job.reach("Finishing")
    await job.held("checkpoint 1 then stop")
    await job.handle.signal(SIGNAL_RUNNER_REPORT, _report(job, "task_failed", message="sink 'out' rejected a batch"))
    return job, Expect("sink 'out' rejected a batch", "Running", generation=2)


@also_drives("Rescaling", "Recovering", "runner lost during the final checkpoint")
async def _rescaling_recovering_lost(lab: Lab) -> tuple[Job, Expect]:
    fake = FakeController(hold_checkpoint=_final_checkpoint_of_generation_1)
    job = await _in_final_checkpoint(lab, "Rescaling", fake)
    await job.handle.signal(SIGNAL_RUNNER_REPORT, _report(job, "lost", message="runner g1-r0 exited"))
    return job, Expect("runner lost during the final checkpoint: runner g1-r0 exited", "Running", generation=2)


@also_drives("Restarting", "Scheduling", "force restart")
async def _restarting_scheduling_force(lab: Lab) -> tuple[Job, Expect]:
    job = await _running(lab)
    await job.patch(restart=RestartCommand(force=True))

    def no_final_checkpoint(job: Job, status: JobStatus) -> None:
        assert job.fake.checkpoints == [], job.fake.checkpoints

    return job, Expect("forced restart: runners torn down", "Running", generation=2, check=no_final_checkpoint)


@also_drives("Restarting", "Scheduling", "safe restart switched to force")
async def _restarting_scheduling_switched(lab: Lab) -> tuple[Job, Expect]:
    job = await _in_final_checkpoint(lab, "Restarting", FakeController(hold_checkpoint=lambda inp: inp.then_stop))
    await job.patch(restart=RestartCommand(force=True))  # a second restart, forced, while the safe one checkpoints
    return job, Expect("forced restart: runners torn down", "Running", generation=2)


# ------------------------------------------------------------------ the tests


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    async with time_skipping_env(search_attributes=True) as e:
        yield e


@pytest_asyncio.fixture(loop_scope="session")
async def lab(env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Lab]:
    async with contextlib.AsyncExitStack() as stack:
        lab = Lab(env, monkeypatch, stack)
        try:
            yield lab
        finally:
            await lab.close()


def _path(transitions: list[TransitionRecord]) -> str:
    return " -> ".join([transitions[0].from_state, *(t.to_state for t in transitions)]) if transitions else "-"


def _row_id(t: Transition) -> str:
    return f"{t.source}->{t.target}"


def test_every_row_is_driven_or_not_drivable() -> None:
    rows = [(t.source, t.target) for t in TRANSITIONS]
    assert len(rows) == len(set(rows)), "a (source, target) pair appears twice in the table"
    missing = [f"{s}->{t}" for s, t in rows if (s, t) not in DRIVERS and (s, t) not in NOT_DRIVABLE]
    assert not missing, f"rows with no driver here and not in NOT_DRIVABLE: {missing}"
    assert not DRIVERS.keys() & NOT_DRIVABLE.keys(), "a row is both driven and listed as not drivable"
    stale = sorted((DRIVERS.keys() | NOT_DRIVABLE.keys()) - set(rows))
    assert not stale, f"drivers or NOT_DRIVABLE entries for rows the table no longer has: {stale}"
    assert all(reason.strip() for reason in NOT_DRIVABLE.values())
    # Every controller-error row is driven by an injected bug in its source state's step.
    assert all(s in STEPS for s, t in rows if s not in TERMINAL)


@pytest.mark.parametrize("row", TRANSITIONS, ids=_row_id)
async def test_row(lab: Lab, row: Transition) -> None:
    key = (row.source, row.target)
    if key in NOT_DRIVABLE:
        pytest.skip(f"not drivable with mocked activities: {NOT_DRIVABLE[key]}")
    job, expect = await DRIVERS[key](lab)
    await _took_row(job, expect, row)


@pytest.mark.parametrize("key, driver", ALTERNATIVES.values(), ids=list(ALTERNATIVES))
async def test_row_by_another_trigger(lab: Lab, key: Row, driver: Driver) -> None:
    row = next(t for t in TRANSITIONS if (t.source, t.target) == key)
    job, expect = await driver(lab)
    await _took_row(job, expect, row)


async def _took_row(job: Job, expect: Expect, row: Transition) -> None:
    """The first move out of the row's source state after the trigger is the row's, with the
    expected reason; the job was then in the row's target and settled where expected."""
    key = (row.source, row.target)

    def left_source(s: JobStatus) -> TransitionRecord | None:
        return next((t for t in s.transitions[job.mark:] if t.from_state == row.source), None)

    def settled(s: JobStatus) -> bool:
        return (
            left_source(s) is not None
            and s.state == expect.settles
            and (expect.generation is None or s.generation == expect.generation)
            and (not s.transitions or s.transitions[-1].to_state == expect.settles)
        )

    status = await job.until(settled, f"left {row.source} and settled in {expect.settles}")
    took = left_source(status)
    assert took is not None
    after = status.transitions[job.mark:]
    assert (took.from_state, took.to_state) == key, _path(after)
    fragments = (expect.reason,) if isinstance(expect.reason, str) else expect.reason
    assert all(f in took.reason for f in fragments), (fragments, took.reason)
    if row.trigger == CONTROLLER_ERROR:
        assert status.failure is not None and status.failure.domain == "internal"
        assert status.failure.message.startswith(f"controller error in {row.source}: RuntimeError")
    # The job really was in the target state: the next move starts there, or it is still there.
    i = after.index(took)
    assert (after[i + 1].from_state if i + 1 < len(after) else status.state) == row.target, _path(after)
    assert status.state == expect.settles
    if expect.settles in TERMINAL:
        desc = await job.handle.describe()
        assert desc.status != WorkflowExecutionStatus.RUNNING
        assert (desc.status == WorkflowExecutionStatus.FAILED) == (expect.settles == "Failed"), desc.status
    if expect.check is not None:
        expect.check(job, status)

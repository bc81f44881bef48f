"""Created, Compiling and Scheduling: from a pipeline to running runners of a new generation."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from sluice.activities.scheduling import SchedulingActivities
    from sluice.models import Failure, RunnerInfo, ScheduleInput, StartExecutionInput
    from sluice.workflows import constants as C
    from sluice.workflows.runner_view import RunnerView
    from sluice.workflows.states.common import cause_of, compile_program, fail_or_recover, stop_transition
    from sluice.workflows.states.placing import PlacementFailed, place_runners, start_placed_runners

if TYPE_CHECKING:
    from sluice.workflows.job import JobWorkflow


async def created(wf: JobWorkflow) -> None:
    wf.transition("Compiling", "job created")


async def compiling(wf: JobWorkflow) -> None:
    if wf.input_problem is not None:
        wf.carried.failure = Failure(message=wf.input_problem, domain="user")
        wf.transition("Failing", f"program invalid: {wf.input_problem}")
        return
    if wf.stop_requested():
        stop_transition(wf, f"stop {wf.carried.config.stop} requested before scheduling", running=False)
        return
    if await compile_program(wf):
        wf.transition("Scheduling", "program valid")


async def scheduling(wf: JobWorkflow) -> None:
    if wf.stop_requested():
        stop_transition(wf, f"stop {wf.carried.config.stop} requested while scheduling", running=False)
        return
    if wf.rescale_needed() and not await compile_program(wf):
        return  # compile_program transitioned
    assert wf.carried.program is not None and wf.carried.checkpoint_url is not None
    wf.carried.generation += 1
    wf.carried.applied_nonce = wf.carried.config.restart_nonce  # this scheduling is the restart asked for
    if wf.carried.ignore_state_pending:
        wf.carried.ignore_state_pending = False
        wf.carried.state_floor = wf.carried.next_epoch
        wf.carried.epoch = 0
    restore = wf.carried.epoch or None
    wf.carried.runners = []
    wf.carried.view = RunnerView(generation=wf.carried.generation)  # reports of older generations no longer count
    wf.show_details()
    runners = await (_schedule_on_hosts(wf) if wf.on_hosts else _schedule_here(wf))
    if runners is None:
        return  # transitioned
    wf.carried.runners = runners
    handle = workflow.start_activity_method(
        SchedulingActivities.start_execution,
        StartExecutionInput(
            job_id=wf.job_id,
            generation=wf.carried.generation,
            program=wf.carried.program,
            runners=runners,
            checkpoint_url=wf.carried.checkpoint_url,
            restore_epoch=restore,
            task_hang_timeout_s=wf.carried.config.task_hang_timeout_s,
            drop_state=sorted(op for op, below in wf.carried.dropped_state.items() if restore and restore <= below),
        ),
        start_to_close_timeout=timedelta(seconds=wf.carried.config.task_startup_timeout_s),
        heartbeat_timeout=C.HEARTBEAT_TIMEOUT,
        retry_policy=C.START_RETRY,
        summary=f"start {len(wf.carried.program.subtasks())} subtasks"
        + (f", restore epoch {restore}" if restore else ", fresh state"),
    )
    if not await wf.race(handle, wf.stop_requested):
        await wf.cancel(handle)
        stop_transition(wf, f"stop {wf.carried.config.stop} requested while starting tasks", running=False)
        return
    try:
        handle.result()
    except BaseException as e:  # noqa: BLE001
        fail_or_recover(wf, e, user="task failed (not retryable)", other="tasks did not start")
        return
    wf.carried.view.running = True
    if wf.carried.started_at is None:
        wf.carried.started_at = workflow.now()
    wf.transition(
        "Running",
        f"generation {wf.carried.generation}: {len(runners)} runners, all subtasks started"
        + (f", restored epoch {restore}" if restore else ""),
    )


async def _schedule_here(wf: JobWorkflow) -> list[RunnerInfo] | None:
    """Runs from before runner hosts: the controller worker starts the runners itself."""
    assert wf.carried.program is not None
    try:
        runners: list[RunnerInfo] = await workflow.execute_activity_method(
            SchedulingActivities.schedule_runners,
            ScheduleInput(
                job_id=wf.job_id,
                generation=wf.carried.generation,
                program=wf.carried.program,
                slots_per_runner=wf.carried.config.slots_per_runner,
                startup_timeout_s=wf.carried.config.runner_startup_timeout_s,
            ),
            start_to_close_timeout=timedelta(seconds=wf.carried.config.runner_startup_timeout_s) + C.SCHEDULE_MARGIN,
            retry_policy=C.SCHEDULE_RETRY,
            summary=f"schedule generation {wf.carried.generation}",
        )
        return runners
    except ActivityError as e:
        wf.carried.last_error = Failure(message=f"scheduling failed: {cause_of(e)}")
        wf.transition("Recovering", wf.carried.last_error.message)
        return None


async def _schedule_on_hosts(wf: JobWorkflow) -> list[RunnerInfo] | None:
    """Place the generation's runners on hosts with free slots and start them there; None if
    the job transitioned (a stop requested while waiting for slots, or a failed start)."""
    try:
        placement = await place_runners(wf)
    except ActivityError as e:
        wf.carried.last_error = Failure(message=f"placing runners failed: {cause_of(e)}")
        wf.transition("Recovering", wf.carried.last_error.message)
        return None
    if placement is None:
        stop_transition(wf, f"stop {wf.carried.config.stop} requested while waiting for runner slots", running=False)
        return None
    try:
        return await start_placed_runners(wf, placement)
    except PlacementFailed as e:
        wf.carried.last_error = Failure(message=f"scheduling failed: {e}")
        wf.transition("Recovering", wf.carried.last_error.message)
        return None

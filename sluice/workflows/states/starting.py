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
        wf.failure = Failure(message=wf.input_problem, domain="user")
        wf.transition("Failing", f"program invalid: {wf.input_problem}")
        return
    if wf.stop_requested():
        stop_transition(wf, f"stop {wf.config.stop} requested before scheduling", running=False)
        return
    if await compile_program(wf):
        wf.transition("Scheduling", "program valid")


async def scheduling(wf: JobWorkflow) -> None:
    if wf.stop_requested():
        stop_transition(wf, f"stop {wf.config.stop} requested while scheduling", running=False)
        return
    if wf.rescale_needed() and not await compile_program(wf):
        return  # compile_program transitioned
    assert wf.program is not None and wf.checkpoint_url is not None
    wf.generation += 1
    wf.applied_nonce = wf.config.restart_nonce  # this scheduling is the restart asked for
    if wf.ignore_state_pending:
        wf.ignore_state_pending = False
        wf.state_floor = wf.next_epoch
        wf.epoch = 0
    restore = wf.epoch or None
    wf.runners = []
    wf.view = RunnerView(generation=wf.generation)  # reports of older generations no longer count
    wf.show_details()
    runners = await (_schedule_on_hosts(wf) if wf.on_hosts else _schedule_here(wf))
    if runners is None:
        return  # transitioned
    wf.runners = runners
    handle = workflow.start_activity_method(
        SchedulingActivities.start_execution,
        StartExecutionInput(
            job_id=wf.job_id,
            generation=wf.generation,
            program=wf.program,
            runners=runners,
            checkpoint_url=wf.checkpoint_url,
            restore_epoch=restore,
            task_hang_timeout_s=wf.config.task_hang_timeout_s,
        ),
        start_to_close_timeout=timedelta(seconds=wf.config.task_startup_timeout_s),
        heartbeat_timeout=C.HEARTBEAT_TIMEOUT,
        retry_policy=C.START_RETRY,
        summary=f"start {len(wf.program.subtasks())} subtasks"
        + (f", restore epoch {restore}" if restore else ", fresh state"),
    )
    if not await wf.race(handle, wf.stop_requested):
        await wf.cancel(handle)
        stop_transition(wf, f"stop {wf.config.stop} requested while starting tasks", running=False)
        return
    try:
        handle.result()
    except BaseException as e:  # noqa: BLE001
        fail_or_recover(wf, e, user="task failed (not retryable)", other="tasks did not start")
        return
    wf.view.running = True
    if wf.started_at is None:
        wf.started_at = workflow.now()
    wf.transition(
        "Running",
        f"generation {wf.generation}: {len(runners)} runners, all subtasks started"
        + (f", restored epoch {restore}" if restore else ""),
    )


async def _schedule_here(wf: JobWorkflow) -> list[RunnerInfo] | None:
    """Runs from before runner hosts: the controller worker starts the runners itself."""
    assert wf.program is not None
    try:
        runners: list[RunnerInfo] = await workflow.execute_activity_method(
            SchedulingActivities.schedule_runners,
            ScheduleInput(
                job_id=wf.job_id,
                generation=wf.generation,
                program=wf.program,
                slots_per_runner=wf.config.slots_per_runner,
                startup_timeout_s=wf.config.runner_startup_timeout_s,
            ),
            start_to_close_timeout=timedelta(seconds=wf.config.runner_startup_timeout_s) + C.SCHEDULE_MARGIN,
            retry_policy=C.SCHEDULE_RETRY,
            summary=f"schedule generation {wf.generation}",
        )
        return runners
    except ActivityError as e:
        wf.last_error = Failure(message=f"scheduling failed: {cause_of(e)}")
        wf.transition("Recovering", wf.last_error.message)
        return None


async def _schedule_on_hosts(wf: JobWorkflow) -> list[RunnerInfo] | None:
    """Place the generation's runners on hosts with free slots and start them there; None if
    the job transitioned (a stop requested while waiting for slots, or a failed start)."""
    try:
        placement = await place_runners(wf)
    except ActivityError as e:
        wf.last_error = Failure(message=f"placing runners failed: {cause_of(e)}")
        wf.transition("Recovering", wf.last_error.message)
        return None
    if placement is None:
        stop_transition(wf, f"stop {wf.config.stop} requested while waiting for runner slots", running=False)
        return None
    try:
        return await start_placed_runners(wf, placement)
    except PlacementFailed as e:
        wf.last_error = Failure(message=f"scheduling failed: {e}")
        wf.transition("Recovering", wf.last_error.message)
        return None

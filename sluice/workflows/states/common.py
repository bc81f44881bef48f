"""Pieces several states share: activity failures, checkpoints, the final checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from sluice.activities.checkpointing import CheckpointActivities
    from sluice.activities.compiling import CompileActivities
    from sluice.models import (
        PERIODIC_SAVEPOINT_PREFIX,
        CheckpointInfo,
        CheckpointInput,
        CompileInput,
        CompileResult,
        Failure,
        JobSpec,
        MonitorResult,
        pipeline_version,
    )
    from sluice.workflows import constants as C
    from sluice.workflows.runner_view import WATCH_FAILURES

if TYPE_CHECKING:
    from sluice.workflows.job import JobWorkflow

ESCALATED = "escalated"


def cause_of(e: BaseException) -> str:
    """The innermost message of an activity failure: what the user needs to read."""
    while (cause := getattr(e, "cause", None)) is not None:
        e = cause
    return str(e) or type(e).__name__


def error_type(e: BaseException | None) -> str | None:
    """The type of the innermost ApplicationError in an activity failure's causes."""
    found = None
    while e is not None:
        if isinstance(e, ApplicationError) and e.type:
            found = e.type
        e = getattr(e, "cause", None)
    return found


def is_user_error(e: BaseException) -> bool:
    return error_type(e) == C.USER_ERROR_TYPE


async def compile_program(wf: JobWorkflow) -> bool:
    """Run the compile activity; on failure transition (Failing or Recovering) and return False."""
    error = await compile_or_error(wf)
    if error is not None:
        fail_or_recover(wf, error, user="program invalid", other="compile failed")
        return False
    return True


async def compile_or_error(wf: JobWorkflow) -> ActivityError | None:
    """Run the compile activity for the job's current pipeline: the program, the store and the
    restore point on success (None), else the activity's error (nothing transitioned)."""
    spec = JobSpec(
        job_id=wf.job_id, pipeline=wf.spec.pipeline, config=wf.carried.config, checkpoint_url=wf.carried.checkpoint_url
    )
    try:
        res: CompileResult = await workflow.execute_activity_method(
            CompileActivities.compile_program,
            CompileInput(spec=spec),
            start_to_close_timeout=C.COMPILE_TIMEOUT,
            retry_policy=C.COMPILE_RETRY,
            summary=f"compile {wf.spec.pipeline.name}",
        )
    except ActivityError as e:
        return e
    wf.carried.program = res.program
    wf.carried.checkpoint_url = res.checkpoint_url
    wf.carried.next_epoch = max(wf.carried.next_epoch, res.highest_epoch + 1)
    if not wf.carried.compiled_once and wf.carried.config.restore_epoch:
        # Restoring an older checkpoint abandons the ones after it: never restore those later.
        wf.carried.epoch = wf.carried.config.restore_epoch
        wf.carried.state_floor = wf.carried.next_epoch
    elif res.latest_epoch >= wf.carried.state_floor:
        # Also a checkpoint whose activity failed after its manifest was written counts.
        wf.carried.epoch = max(wf.carried.epoch, res.latest_epoch)
    wf.carried.compiled_once = True
    return None


def fail_or_recover(wf: JobWorkflow, e: BaseException, *, user: str, other: str) -> None:
    """A failed activity: a user error fails the job (domain user), a corrupt checkpoint fails it
    too (domain external: restoring it again cannot help; the message names epoch and file and how
    to restore an older one), anything else recovers."""
    kind = error_type(e)
    if kind == C.USER_ERROR_TYPE:
        wf.carried.failure = Failure(message=cause_of(e), domain="user")
        wf.transition("Failing", f"{user}: {cause_of(e)}")
    elif kind == C.CORRUPT_CHECKPOINT_TYPE:
        wf.carried.failure = Failure(message=cause_of(e), domain="external")
        wf.transition("Failing", f"corrupt checkpoint: {cause_of(e)}")
    else:
        wf.carried.last_error = Failure(message=f"{other}: {cause_of(e)}")
        wf.transition("Recovering", wf.carried.last_error.message)


def start_checkpoint(wf: JobWorkflow, then_stop: bool, savepoint: str | None = None) -> None:
    """Start checkpoint `next_epoch`, kept as savepoint `savepoint` when given.

    A periodic checkpoint of a run started with the local-checkpoints patch runs as a local
    activity: its result is one marker event in history, recorded by the workflow task that was
    open while it ran (6 events per checkpoint instead of 11). Savepoints and final checkpoints
    stay regular activities, visible as pending activities in the UI with their retries, and so do
    the checkpoints of a job whose checkpoint timeout is longer than a workflow task may stay open."""
    assert wf.carried.program is not None and wf.carried.checkpoint_url is not None
    epoch = wf.carried.next_epoch
    wf.carried.next_epoch += 1
    what = f"checkpoint epoch {epoch}" + (" then stop" if then_stop else "")
    inp = CheckpointInput(
        job_id=wf.job_id,
        generation=wf.carried.generation,
        program=wf.carried.program,
        runners=wf.carried.runners,
        checkpoint_url=wf.carried.checkpoint_url,
        epoch=epoch,
        then_stop=then_stop,
        finish_timeout_s=wf.carried.config.finish_timeout_s,
        savepoint=savepoint,
        pipeline_version=pipeline_version(wf.spec.pipeline) if savepoint is not None else "",
        retention=wf.retention() if wf.lean_checkpoints else None,
        defer_commit=wf.holding_output(),
    )
    timeout = timedelta(seconds=wf.carried.config.checkpoint_timeout_s)
    if wf.local_checkpoints and not then_stop and savepoint is None and timeout <= C.CHECKPOINT_LOCAL_MAX_TIMEOUT:
        # The job's checkpoint timeout bounds all attempts together here (a regular activity's
        # bounds each attempt): a local attempt that hangs is noticed by this timeout, not by
        # heartbeats (a local activity has none).
        wf.inflight_checkpoint = workflow.start_local_activity_method(
            CheckpointActivities.checkpoint,
            inp,
            schedule_to_close_timeout=timeout,
            retry_policy=C.CHECKPOINT_RETRY,
            local_retry_threshold=C.CHECKPOINT_LOCAL_RETRY_THRESHOLD,
            summary=what,
        )
    else:
        wf.inflight_checkpoint = workflow.start_activity_method(
            CheckpointActivities.checkpoint,
            inp,
            start_to_close_timeout=timeout,
            heartbeat_timeout=C.HEARTBEAT_TIMEOUT,
            retry_policy=C.CHECKPOINT_RETRY,
            summary=what if savepoint is None else f"savepoint {savepoint}: {what}",
        )
    wf.show_details()


def start_savepoint(wf: JobWorkflow) -> None:
    """Serve the oldest waiting `savepoint` update (no checkpoint may be in flight)."""
    assert wf.inflight_checkpoint is None
    pending = wf.savepoints.next()
    default = f"{PERIODIC_SAVEPOINT_PREFIX if pending.periodic else 'savepoint-'}{wf.carried.next_epoch}"
    start_checkpoint(wf, then_stop=False, savepoint=pending.name or default)


@dataclass(frozen=True)
class CheckpointFailed:
    """Why a checkpoint failed; `retryable` is False when a task failed for good during it."""

    failure: Failure
    retryable: bool = True


def checkpoint_failure(e: BaseException) -> CheckpointFailed:
    """A failed checkpoint activity as the job reports it. A task that failed during the
    checkpoint (the activity saw it before the monitor did) is reported exactly as the monitor
    would: its own message, operator and traceback, so a repeating failure is recognised."""
    app = innermost_application_error(e)
    if app is not None and app.type == C.TASK_FAILED_TYPE and app.details and isinstance(app.details[0], dict):
        d = app.details[0]
        return CheckpointFailed(
            Failure(
                message=app.message, domain=d.get("domain") or "internal",
                operator=d.get("operator"), traceback=d.get("traceback"),
            ),
            retryable=bool(d.get("retryable", True)),
        )
    return CheckpointFailed(Failure(message=f"checkpoint failed: {cause_of(e)}"))


def innermost_application_error(e: BaseException | None) -> ApplicationError | None:
    found = None
    while e is not None:
        if isinstance(e, ApplicationError):
            found = e
        e = getattr(e, "cause", None)
    return found


def take_checkpoint_result(wf: JobWorkflow) -> CheckpointFailed | None:
    """Consume the finished in-flight checkpoint: None on success, else why it failed."""
    handle, wf.inflight_checkpoint = wf.inflight_checkpoint, None
    assert handle is not None and handle.done()
    try:
        info: CheckpointInfo = handle.result()
    except BaseException as e:  # noqa: BLE001
        app = innermost_application_error(e)
        if wf.savepoints.inflight is not None and app is not None and app.type == C.SAVEPOINT_EXISTS_TYPE:
            wf.savepoints.finish(app.message)  # refused before any barrier: the job runs on
            return None
        failed = checkpoint_failure(e)
        wf.savepoints.finish(f"its checkpoint failed: {failed.failure.message}")
        return failed
    wf.savepoints.finish(info.savepoint or "the checkpoint completed without a savepoint record")
    wf.carried.epoch = info.epoch
    if wf.holding_output():
        assert wf.carried.upgrade is not None
        wf.carried.upgrade.deferred_epochs.append(info.epoch)
    wf.progress_made()
    if not wf.lean_checkpoints:
        wf.start_cleanup()  # else the checkpoint activity applied retention itself
    return None


async def final_checkpoint(
    wf: JobWorkflow, escalate: Callable[[], bool], savepoint: str | None = None
) -> Failure | str | None:
    """Checkpoint with then-stop and wait until every task finished (kept as `savepoint` if named).

    A periodic checkpoint in flight is waited for first (its result kept). Meanwhile runner
    liveness and task failures are watched, and `escalate()` is honoured at any moment, so a
    lost runner or a force stop never leaves the job hanging here. Returns None on success,
    ESCALATED, or the failure.
    """
    await wf.cancel_monitor()
    wf.start_monitor(WATCH_FAILURES)
    final_started = False
    while True:
        if wf.inflight_checkpoint is None:
            if final_started:
                return None
            start_checkpoint(wf, then_stop=True, savepoint=savepoint)
            final_started = True
        handle = wf.inflight_checkpoint
        assert handle is not None  # started above, or a periodic one in flight
        monitor = wf.monitor
        await workflow.wait_condition(
            lambda: handle.done() or (monitor is not None and monitor.done()) or escalate()  # noqa: B023 - awaited in this iteration
        )
        if escalate():
            await wf.cancel(handle)
            wf.inflight_checkpoint = None
            return ESCALATED
        if handle.done():
            problem = take_checkpoint_result(wf)
            if problem and final_started:
                await wf.cancel_monitor()
                return problem.failure
            continue  # a failed periodic checkpoint does not matter: the final one follows
        outcome = wf.monitor_outcome()
        await wf.cancel(handle)
        wf.inflight_checkpoint = None
        failure = outcome_failure(outcome)
        if outcome.kind == "runner_lost":
            return failure.model_copy(update={"message": f"runner lost during the final checkpoint: {failure.message}"})
        return failure


def outcome_failure(outcome: MonitorResult) -> Failure:
    """What the monitor reported, as the job's failure (operator and traceback kept)."""
    return Failure(
        message=outcome.message, domain=outcome.domain, operator=outcome.operator, traceback=outcome.traceback
    )


def stop_transition(wf: JobWorkflow, reason: str, running: bool) -> None:
    """Go to the stop state the requested mode calls for (the reference's stop macros)."""
    mode = wf.carried.config.stop
    if running and mode == "checkpoint":
        wf.transition("CheckpointStopping", reason)
        return
    wf.carried.stop_mode = mode if running else wf.non_running_stop_mode()
    wf.transition("Stopping", reason)


def seconds_until(wf: JobWorkflow, deadline: datetime) -> float:
    return max(0.0, (deadline - workflow.now()).total_seconds())

"""Upgrading, and the parts of a pipeline upgrade that run beside Running.

An upgrade's life (`UpgradeStatus.phase`):
- `checking` (in Running, the old generation keeps running): the new pipeline is compiled and its
  state compared with the running program's (`check_upgrade`); incompatible: `refused`;
- `awaiting_approval` (in Running, checkpoints go on) until `approve_upgrade` approves or rejects;
- `savepoint` (state Upgrading): the old generation takes a then-stop savepoint (mode savepoint)
  or is torn down (last-state, stateless); then the job's pipeline is the new one;
- `switching` (Scheduling): the new generation starts from the restore point;
- `health_window` (Running): the new generation must not fail and must complete a checkpoint for
  `health_window_s`. Its checkpoints are taken but their output is held back (commit phase
  deferred), so that a rollback publishes none of it;
- `completed`: the held-back output is published in epoch order;
- `rolling_back` (Upgrading): any failure in `switching` or `health_window`: the new generation is
  killed, the old pipeline and config come back, and the job restores the restore point, never
  one of the new pipeline's checkpoints; its held-back output is discarded by sink recovery;
- `rolled_back`: the old pipeline runs again; `reason` says why.
Every step is a workflow step: a controller crash anywhere resumes it where it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from sluice.activities.checkpointing import CheckpointActivities
    from sluice.activities.compiling import CompileActivities
    from sluice.models import (
        CommitEpochsInput,
        Failure,
        JobConfig,
        JobSpec,
        UpgradeCheckInput,
        UpgradeCheckResult,
        UpgradePhase,
        UpgradeStatus,
    )
    from sluice.workflows import constants as C
    from sluice.workflows.metrics import record_upgrade
    from sluice.workflows.states.common import (
        ESCALATED,
        cause_of,
        compile_or_error,
        fail_or_recover,
        final_checkpoint,
        stop_transition,
        take_checkpoint_result,
    )

if TYPE_CHECKING:
    from sluice.workflows.job import JobWorkflow


def _upgrade(wf: JobWorkflow) -> UpgradeStatus:
    up = wf.carried.upgrade
    assert up is not None
    return up


def finish(wf: JobWorkflow, phase: UpgradePhase, reason: str) -> None:
    """End the upgrade in `phase` (refused, rejected, completed, rolled_back, abandoned)."""
    up = _upgrade(wf)
    up.phase = phase
    up.reason = reason
    up.finished_at = workflow.now()
    wf.carried.upgrade_program = None
    record_upgrade(wf.job_id, phase)
    workflow.logger.info("job %s: upgrade %s %s: %s", wf.job_id, up.number, phase, reason)
    wf.show_details()


# ---------------------------------------------------------------------------- in Running


def start_upgrade_check(wf: JobWorkflow) -> None:
    """Compile the new pipeline and compare it with the running program (old generation runs on)."""
    up = _upgrade(wf)
    assert wf.carried.program is not None
    spec = JobSpec(job_id=wf.job_id, pipeline=up.new_pipeline, config=_new_config(wf))
    wf.upgrade_check = workflow.start_activity_method(
        CompileActivities.check_upgrade,
        UpgradeCheckInput(spec=spec, program=wf.carried.program, allow_drop_state=up.allow_drop_state),
        start_to_close_timeout=C.COMPILE_TIMEOUT,
        retry_policy=C.COMPILE_RETRY,
        summary=f"upgrade {up.number}: check pipeline version {up.to_version} against the job's state",
    )


def take_upgrade_check(wf: JobWorkflow) -> None:
    """The check's verdict: refused (nothing changed), awaiting approval, or on to the savepoint."""
    handle, wf.upgrade_check = wf.upgrade_check, None
    assert handle is not None and handle.done()
    up = _upgrade(wf)
    try:
        result: UpgradeCheckResult = handle.result()
    except ActivityError as e:
        up.problems = [cause_of(e)]
        finish(wf, "refused", f"upgrade refused: {cause_of(e)}")
        return
    if result.problems:
        up.problems = result.problems
        finish(wf, "refused", "upgrade refused: " + "; ".join(result.problems))
        return
    up.dropped_state = result.dropped_state
    wf.carried.upgrade_program = result.program
    up.phase = "awaiting_approval" if up.require_approval else "savepoint"
    wf.show_details()


def holding_output(up: UpgradeStatus | None) -> bool:
    """In the health window: checkpoints are taken, their output held back."""
    return up is not None and up.phase == "health_window"


async def settle_upgrade(wf: JobWorkflow, why: str) -> bool:
    """End a health window early as healthy (the job leaves Running for another reason: a stop,
    its TTL, its sources finished): the checkpoint in flight completes first, then the held-back
    output is published. Returns False if that checkpoint failed (the job then rolls back)."""
    handle = wf.inflight_checkpoint
    if handle is not None:
        await workflow.wait_condition(handle.done)
        problem = take_checkpoint_result(wf)
        if problem is not None:
            wf.carried.last_error = problem.failure
            wf.transition("Recovering", problem.failure.message)  # redirected into a rollback
            return False
    await complete_upgrade(wf, why)
    return True


async def complete_upgrade(wf: JobWorkflow, why: str) -> None:
    """The health window ended healthy: publish the held-back output, oldest epoch first."""
    up = _upgrade(wf)
    assert wf.carried.program is not None and wf.carried.checkpoint_url is not None
    if up.deferred_epochs:
        await workflow.execute_activity_method(
            CheckpointActivities.commit_epochs,
            CommitEpochsInput(
                job_id=wf.job_id,
                generation=wf.carried.generation,
                program=wf.carried.program,
                checkpoint_url=wf.carried.checkpoint_url,
                epochs=up.deferred_epochs,
            ),
            start_to_close_timeout=C.COMMIT_EPOCHS_TIMEOUT,
            heartbeat_timeout=C.HEARTBEAT_TIMEOUT,
            retry_policy=C.COMMIT_EPOCHS_RETRY,
            summary=f"upgrade {up.number}: publish held-back output of epochs "
            f"{up.deferred_epochs[0]}-{up.deferred_epochs[-1]}",
        )
    finish(wf, "completed", why)


# ---------------------------------------------------------------------------- the state


async def upgrading(wf: JobWorkflow) -> None:
    up = _upgrade(wf)
    if up.phase == "rolling_back":
        await _roll_back(wf)
        return
    assert up.phase == "savepoint"
    if up.mode == "savepoint":
        name = f"upgrade-{up.number}-epoch-{wf.carried.next_epoch}"
        result = await _final_savepoint(wf, name)
        if result == ESCALATED:
            finish(wf, "abandoned", f"stop {wf.carried.config.stop} requested while taking the upgrade's savepoint")
            stop_transition(wf, f"stop {wf.carried.config.stop} requested during upgrade {up.number}", running=False)
            return
        if isinstance(result, Failure):
            finish(wf, "abandoned", f"the savepoint before the switch failed: {result.message}")
            wf.carried.last_error = result
            wf.transition("Recovering", f"upgrade {up.number}: savepoint failed: {result.message}")
            return
        up.savepoint = name
    else:
        await wf.cancel(wf.inflight_checkpoint)
        wf.inflight_checkpoint = None
        await wf.cancel_monitor()
    await _kill_generation(wf)
    if wf.stop_requested():
        # The old generation is down and its state is in the restore point: stop there.
        finish(wf, "abandoned", f"stop {wf.carried.config.stop} requested before the switch")
        stop_transition(wf, f"stop {wf.carried.config.stop} requested during upgrade {up.number}", running=False)
        return
    await _switch(wf)


async def _final_savepoint(wf: JobWorkflow, name: str) -> Failure | str | None:
    # A checkpoint or graceful stop waits for the savepoint (it ends at a clean point anyway).
    return await final_checkpoint(wf, lambda: wf.carried.config.stop in ("immediate", "force"), savepoint=name)


async def _kill_generation(wf: JobWorkflow) -> None:
    await wf.cancel_monitor()  # the next generation's Running starts its own
    try:
        await wf.teardown(generation=wf.carried.generation, kill=True)
    except BaseException as e:  # noqa: BLE001 - Scheduling fences and kills older generations again
        workflow.logger.warning("teardown of generation %s failed: %s", wf.carried.generation, cause_of(e))
    wf.carried.runners = []


def _new_config(wf: JobWorkflow) -> JobConfig:
    """The job's config on the new pipeline: overrides of operators it no longer has are dropped."""
    up = _upgrade(wf)
    ids = {op.id for op in up.new_pipeline.operators}
    config = wf.carried.config.model_copy(deep=True)
    config.overrides = {op: n for op, n in config.overrides.items() if op in ids}
    return config


async def _switch(wf: JobWorkflow) -> None:
    """The job's pipeline becomes the new one; Scheduling starts it from the restore point."""
    up = _upgrade(wf)
    up.restore_epoch = wf.carried.epoch or None
    wf.carried.config = _new_config(wf)
    wf.spec = wf.spec.model_copy(update={"pipeline": up.new_pipeline})
    if up.mode == "stateless":
        wf.carried.state_floor = wf.carried.next_epoch
        wf.carried.epoch = 0
    for op in up.dropped_state:
        wf.carried.dropped_state[op] = up.restore_epoch or 0
    up.phase = "switching"
    error = await compile_or_error(wf)  # claims the new sinks; the restore point stays
    if error is not None:
        up.phase = "rolling_back"
        up.reason = f"the new pipeline did not compile: {cause_of(error)}"
        await _roll_back(wf)
        return
    wf.upsert_search_attributes()
    start = f"from epoch {up.restore_epoch}" if up.restore_epoch and up.mode != "stateless" else "with empty state"
    wf.transition("Scheduling", f"upgrade {up.number}: pipeline version {up.to_version}, {start}")


async def _roll_back(wf: JobWorkflow) -> None:
    """Back to the old pipeline and config at the restore point; the new generation's held-back
    output is never published (sink recovery at the restore discards it)."""
    up = _upgrade(wf)
    await wf.cancel(wf.inflight_checkpoint)
    wf.inflight_checkpoint = None
    await wf.cancel_monitor()
    await _kill_generation(wf)
    config = wf.carried.config.model_copy(deep=True)
    config.parallelism, config.overrides = up.previous_parallelism, dict(up.previous_overrides)
    wf.carried.config = config
    wf.spec = wf.spec.model_copy(update={"pipeline": up.previous_pipeline})
    for op in up.dropped_state:
        wf.carried.dropped_state.pop(op, None)
    # Never restore one of the new pipeline's checkpoints: the old pipeline cannot read them, and
    # their output was never published.
    wf.carried.state_floor = wf.carried.next_epoch
    wf.carried.epoch = up.restore_epoch or 0
    reason = up.reason or "the new generation failed"
    finish(wf, "rolled_back", f"rollback: {reason}")
    wf.upsert_search_attributes()
    error = await compile_or_error(wf)
    if error is not None:
        fail_or_recover(wf, error, user="program invalid", other="compile failed")
        return
    start = f"from epoch {wf.carried.epoch}" if wf.carried.epoch else "with empty state"
    wf.transition("Scheduling", f"rollback of upgrade {up.number} ({reason}): previous pipeline {start}")

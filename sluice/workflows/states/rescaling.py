"""Rescaling and Restarting: a final checkpoint (or a forced teardown), then a new generation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from sluice.models import Failure
    from sluice.workflows.states.common import ESCALATED, cause_of, final_checkpoint, stop_transition

if TYPE_CHECKING:
    from collections.abc import Callable

    from sluice.workflows.job import JobWorkflow


async def rescaling(wf: JobWorkflow) -> None:
    await _through_final_checkpoint(wf, f"rescaling to {wf.desired_parallelism()}", lambda: False)


async def restarting(wf: JobWorkflow) -> None:
    if wf.carried.restart_mode == "safe":
        # A second restart with force while the safe one checkpoints switches to force.
        done = await _through_final_checkpoint(wf, "safe restart", lambda: wf.carried.config.restart_mode == "force")
        if done:
            return
    await wf.cancel(wf.inflight_checkpoint)
    wf.inflight_checkpoint = None
    await wf.cancel_monitor()
    await _teardown_then_schedule(wf, "forced restart: runners torn down")


async def _through_final_checkpoint(wf: JobWorkflow, what: str, switch_to_force: Callable[[], bool]) -> bool:
    """Final checkpoint then Scheduling; returns False only when asked to switch to force."""
    result = await final_checkpoint(wf, lambda: wf.stop_requested() or switch_to_force())
    if result is None:
        await wf.cancel_monitor()
        await _teardown_then_schedule(wf, f"{what}: final checkpoint epoch {wf.carried.epoch} done")
        return True
    if result == ESCALATED:
        if wf.stop_requested():
            stop_transition(wf, f"stop {wf.carried.config.stop} requested during {what}", running=False)
            return True
        return False
    assert isinstance(result, Failure)
    wf.carried.last_error = result
    wf.transition("Recovering", f"{what}: {result.message}")
    return True


async def _teardown_then_schedule(wf: JobWorkflow, reason: str) -> None:
    try:
        await wf.teardown(generation=wf.carried.generation)
    except BaseException as e:  # noqa: BLE001 - Scheduling kills older generations again
        workflow.logger.warning("teardown of generation %s failed: %s", wf.carried.generation, cause_of(e))
    wf.carried.runners = []
    wf.transition("Scheduling", reason)

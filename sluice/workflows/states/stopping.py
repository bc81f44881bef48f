"""CheckpointStopping, Stopping and Finishing: ways out of Running, each bounded in time."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from sluice.activities.stopping import StopActivities
    from sluice.models import Failure, StopInput
    from sluice.workflows import constants as C
    from sluice.workflows.states.common import ESCALATED, cause_of, final_checkpoint

if TYPE_CHECKING:
    from sluice.workflows.job import JobWorkflow


async def checkpoint_stopping(wf: JobWorkflow) -> None:
    result = await final_checkpoint(wf, lambda: wf.carried.config.stop in ("graceful", "immediate", "force"))
    if result is None:
        await wf.release_runners()
        wf.transition("Stopped", f"final checkpoint epoch {wf.carried.epoch} committed, all tasks finished")
    elif result == ESCALATED:
        wf.carried.stop_mode = wf.carried.config.stop
        wf.transition("Stopping", f"stop {wf.carried.config.stop} requested during the final checkpoint")
    else:
        assert isinstance(result, Failure)
        wf.carried.stop_mode = "force"
        wf.transition("Stopping", f"{result.message}; killing runners (restore point stays epoch {wf.carried.epoch})")


async def stopping(wf: JobWorkflow) -> None:
    await wf.cancel(wf.inflight_checkpoint)
    wf.inflight_checkpoint = None
    mode = wf.carried.stop_mode or wf.non_running_stop_mode()
    reason = ""
    # graceful -> immediate -> force: a later, stronger stop request escalates the one running.
    while mode in ("graceful", "immediate") and wf.carried.runners:
        handle = workflow.start_activity_method(
            StopActivities.stop_runners,
            StopInput(
                job_id=wf.job_id,
                generation=wf.carried.generation,
                runners=wf.carried.runners,
                mode=mode,
                finish_timeout_s=wf.carried.config.finish_timeout_s,
            ),
            start_to_close_timeout=timedelta(seconds=wf.carried.config.finish_timeout_s) + C.STOP_MARGIN,
            heartbeat_timeout=C.HEARTBEAT_TIMEOUT,
            retry_policy=C.STOP_RETRY,
            summary=f"stop {mode}",
        )
        stronger = _stronger_than(mode)
        if not await wf.race(handle, lambda: wf.carried.config.stop in stronger):  # noqa: B023 - awaited in this iteration
            await wf.cancel(handle)
            mode = wf.carried.config.stop
            continue
        try:
            handle.result()
            reason = f"stop {mode}: all tasks finished"
            break
        except BaseException as e:  # noqa: BLE001
            reason = f"stop {mode} did not finish ({cause_of(e)}); runners killed"
            mode = "force"
    await wf.release_runners()
    wf.transition("Stopped", reason or f"stop {mode}: runners killed")


def _stronger_than(mode: str) -> tuple[str, ...]:
    return ("immediate", "force") if mode == "graceful" else ("force",)


async def finishing(wf: JobWorkflow) -> None:
    result = await final_checkpoint(wf, wf.stop_requested)
    if result is None:
        await wf.release_runners()
        wf.transition("Finished", f"final checkpoint epoch {wf.carried.epoch} committed, all tasks finished")
    elif result == ESCALATED:
        wf.carried.stop_mode = wf.non_running_stop_mode()
        wf.transition("Stopping", f"stop {wf.carried.config.stop} requested while finishing")
    else:
        assert isinstance(result, Failure)
        wf.carried.last_error = result
        wf.transition("Recovering", result.message)

"""Recovering and Failing: the restart budget, backoff, and the way to Failed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from sluice.models import Failure
    from sluice.workflows import constants as C
    from sluice.workflows.states.common import cause_of

if TYPE_CHECKING:
    from sluice.workflows.job import JobWorkflow


def restart_backoff_s(restarts: int, jitter: float, *, immediate_first: bool = True) -> float:
    """The wait before restart number `restarts` (1 = the first since the job was healthy).

    The first restart is immediate; then exponential with jitter, half the step plus up to half
    again: 1-2 s, 2-4 s, ... 30-60 s. Runs from before the fast-recovery patch
    (`immediate_first=False`) wait before every restart: 0.25-0.5 s, 0.5-1 s, ... 30-60 s."""
    if immediate_first:
        if restarts <= 1:
            return 0.0
        initial, doublings = C.RESTART_BACKOFF_INITIAL_S, restarts - 2
    else:
        initial, doublings = C.RESTART_BACKOFF_INITIAL_S_BEFORE_FAST_RECOVERY, max(0, restarts - 1)
    step: float = min(C.RESTART_BACKOFF_MAX_S, initial * 2**doublings)
    return step / 2 + jitter * step / 2


async def recovering(wf: JobWorkflow) -> None:
    await wf.cancel(wf.inflight_checkpoint)
    wf.inflight_checkpoint = None
    await wf.cancel_monitor()
    reason = wf.carried.last_error.message if wf.carried.last_error else "unknown failure"
    if wf.stop_requested():
        _stop(wf)
        return
    allowed = wf.carried.config.allowed_restarts
    if allowed != -1 and wf.carried.restarts > allowed:
        domain = wf.carried.last_error.domain if wf.carried.last_error else "internal"
        last = wf.carried.last_error
        wf.carried.failure = Failure(
            message=f"exhausted {allowed} allowed restarts; last error: {reason}", domain=domain,
            operator=last.operator if last else None, traceback=last.traceback if last else None,
        )
        wf.transition("Failing", wf.carried.failure.message)
        return
    if wf.repeats_deterministically():
        f = wf.carried.streak_failure
        assert f is not None
        streak = wf.carried.failure_streak
        wf.carried.failure = f.model_copy(
            update={"message": f"the same failure {streak} times in a row, not retried again: {f.message}"}
        )
        wf.transition("Failing", wf.carried.failure.message)
        return
    if wf.continue_as_new_due():
        # A job that keeps recovering (an unlimited budget) must renew its history too; the next
        # run resumes here, in Recovering, with the same count.
        await wf.continue_as_new()
    delay = restart_backoff_s(wf.carried.restarts, workflow.random().random(), immediate_first=wf.fast_recovery)
    if delay > 0:
        try:
            await workflow.wait_condition(
                wf.stop_requested, timeout=delay, timeout_summary=f"backoff before restart {wf.carried.restarts}"
            )
        except TimeoutError:
            pass
        if wf.stop_requested():
            _stop(wf)
            return
    try:
        # The failed generation is killed, not drained: its state is the last checkpoint's, and
        # the store's generation fence refuses whatever it would still try to commit.
        await wf.teardown(generation=None, kill=wf.fast_recovery)
    except BaseException as e:  # noqa: BLE001 - Scheduling kills older generations again
        workflow.logger.warning("teardown while recovering failed: %s", cause_of(e))
    wf.carried.runners = []
    waited = f"after {delay:.1f} s backoff" if delay > 0 else "at once (first restart)"
    wf.transition("Compiling", f"restart {wf.carried.restarts} {waited}")


def _stop(wf: JobWorkflow) -> None:
    # The runners' condition is unknown while recovering: kill them rather than wait on them.
    wf.carried.stop_mode = "force"
    wf.transition("Stopping", f"stop {wf.carried.config.stop} requested while recovering")


async def failing(wf: JobWorkflow) -> None:
    await wf.release_runners()
    wf.transition("Failed", (wf.carried.failure or Failure(message="job failed")).message)

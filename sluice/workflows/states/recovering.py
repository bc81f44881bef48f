"""Recovering and Failing: the restart budget, backoff, and the way to Failed."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from sluice.models import Failure
    from sluice.workflows import constants as C
    from sluice.workflows.states.common import cause_of

if TYPE_CHECKING:
    from sluice.workflows.job import JobWorkflow


def restart_backoff_s(restarts: int, jitter: float) -> float:
    """Exponential backoff with jitter: half the step plus up to half again (0.5 s .. 60 s)."""
    step = min(C.RESTART_BACKOFF_MAX_S, C.RESTART_BACKOFF_INITIAL_S * 2 ** max(0, restarts - 1))
    return step / 2 + jitter * step / 2


async def recovering(wf: "JobWorkflow") -> None:
    await wf.cancel(wf.inflight_checkpoint)
    wf.inflight_checkpoint = None
    await wf.cancel_monitor()
    reason = wf.last_error.message if wf.last_error else "unknown failure"
    if wf.stop_requested():
        _stop(wf)
        return
    allowed = wf.config.allowed_restarts
    if allowed != -1 and wf.restarts > allowed:
        domain = wf.last_error.domain if wf.last_error else "internal"
        last = wf.last_error
        wf.failure = Failure(
            message=f"exhausted {allowed} allowed restarts; last error: {reason}", domain=domain,
            operator=last.operator if last else None, traceback=last.traceback if last else None,
        )
        wf.transition("Failing", wf.failure.message)
        return
    if wf.repeats_deterministically():
        f = wf.streak_failure
        assert f is not None
        wf.failure = f.model_copy(
            update={"message": f"the same failure {wf.failure_streak} times in a row, not retried again: {f.message}"}
        )
        wf.transition("Failing", wf.failure.message)
        return
    if wf.continue_as_new_due():
        # A job that keeps recovering (an unlimited budget) must renew its history too; the next
        # run resumes here, in Recovering, with the same count.
        await wf.continue_as_new()
    delay = restart_backoff_s(wf.restarts, workflow.random().random())
    try:
        await workflow.wait_condition(
            wf.stop_requested, timeout=delay, timeout_summary=f"backoff before restart {wf.restarts}"
        )
    except asyncio.TimeoutError:
        pass
    if wf.stop_requested():
        _stop(wf)
        return
    try:
        await wf.teardown(generation=None)
    except BaseException as e:  # noqa: BLE001 - Scheduling kills older generations again
        workflow.logger.warning("teardown while recovering failed: %s", cause_of(e))
    wf.runners = []
    wf.transition("Compiling", f"restart {wf.restarts} after {delay:.1f} s backoff")


def _stop(wf: "JobWorkflow") -> None:
    # The runners' condition is unknown while recovering: kill them rather than wait on them.
    wf.stop_mode = "force"
    wf.transition("Stopping", f"stop {wf.config.stop} requested while recovering")


async def failing(wf: "JobWorkflow") -> None:
    await wf.release_runners()
    wf.transition("Failed", (wf.failure or Failure(message="job failed")).message)

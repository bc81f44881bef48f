"""Running: periodic checkpoints, runner watch, commands, TTL, healthy-duration reset."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from sluice.models import Failure
    from sluice.workflows.states.common import (
        seconds_until,
        start_checkpoint,
        stop_transition,
        take_checkpoint_result,
    )

if TYPE_CHECKING:
    from sluice.workflows.job import JobWorkflow

FAR = timedelta(days=3650)


async def running(wf: "JobWorkflow") -> None:
    from sluice.workflows.job import WATCH_ALL

    if wf.monitor is None:
        wf.start_monitor(WATCH_ALL)
    entered = workflow.now()
    next_checkpoint = entered + timedelta(seconds=wf.config.checkpoint_interval_s)
    while True:
        # Commands first: they are the user's intent, and they are never dropped.
        if wf.stop_requested():
            if wf.config.stop != "checkpoint":
                await wf.cancel(wf.inflight_checkpoint)
                wf.inflight_checkpoint = None
            stop_transition(wf, f"stop {wf.config.stop} requested", running=True)
            return
        if wf.restart_needed():
            wf.restart_mode = wf.config.restart_mode
            wf.transition("Restarting", f"restart requested ({wf.config.restart_mode})")
            return
        if wf.rescale_needed():
            wf.transition("Rescaling", f"parallelism changed to {wf.desired_parallelism()}")
            return
        ttl_deadline = _ttl_deadline(wf)
        if ttl_deadline is not None and workflow.now() >= ttl_deadline:
            await wf.cancel(wf.inflight_checkpoint)
            wf.inflight_checkpoint = None
            wf.stop_mode = "immediate"
            wf.transition("Stopping", f"TTL of {wf.config.ttl_s:g} s expired")
            return

        if wf.monitor is not None and wf.monitor.done():
            outcome = wf.monitor_outcome()
            if outcome.kind in ("sources_finished", "all_finished"):
                wf.transition("Finishing", "all sources finished")
                return
            await wf.cancel(wf.inflight_checkpoint)
            wf.inflight_checkpoint = None
            if outcome.kind == "task_failed" and not outcome.retryable:
                wf.failure = Failure(message=outcome.message, domain=outcome.domain)
                wf.transition("Failing", f"task failed (not retryable): {outcome.message}")
            else:
                wf.last_error = Failure(message=outcome.message, domain=outcome.domain)
                wf.transition("Recovering", f"{outcome.kind.replace('_', ' ')}: {outcome.message}")
            return

        if wf.inflight_checkpoint is not None and wf.inflight_checkpoint.done():
            problem = take_checkpoint_result(wf)
            if problem:
                wf.last_error = Failure(message=problem)
                wf.transition("Recovering", problem)
                return
            wf.show_details()

        healthy_at = entered + timedelta(seconds=wf.config.healthy_duration_s)
        if wf.restarts > 0 and workflow.now() >= healthy_at:
            workflow.logger.info("job %s healthy for %s: restart count reset", wf.job_id, healthy_at - entered)
            wf.restarts = 0
            wf.show_details()

        if wf.inflight_checkpoint is None:
            if wf.continue_as_new_due():
                await wf.continue_as_new()
            if workflow.now() >= next_checkpoint:
                start_checkpoint(wf, then_stop=False)
                next_checkpoint = workflow.now() + timedelta(seconds=wf.config.checkpoint_interval_s)

        wake_at = min(
            next_checkpoint if wf.inflight_checkpoint is None else workflow.now() + FAR,
            ttl_deadline or workflow.now() + FAR,
            healthy_at if wf.restarts > 0 else workflow.now() + FAR,
        )
        seen = wf.commands_seen
        monitor, inflight = wf.monitor, wf.inflight_checkpoint
        try:
            await workflow.wait_condition(
                lambda: wf.commands_seen != seen
                or (monitor is not None and monitor.done())
                or (inflight is not None and inflight.done()),
                timeout=max(seconds_until(wf, wake_at), 0.001),
            )
        except asyncio.TimeoutError:
            pass


def _ttl_deadline(wf: "JobWorkflow") -> datetime | None:
    if wf.config.ttl_s is None or wf.started_at is None:
        return None
    return wf.started_at + timedelta(seconds=wf.config.ttl_s)

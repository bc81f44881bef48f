"""Running: periodic checkpoints and savepoints, runner watch, commands, TTL, healthy-duration reset.

Every decision here is taken on an event recorded in history (a timer fired, an activity finished,
a command arrived), never by comparing `workflow.now()` with a deadline: a workflow task that runs
late (a retry on another worker after a failover) must decide exactly what its replay decides.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TYPE_CHECKING

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from sluice.workflows.runner_view import WATCH_ALL
    from sluice.workflows.states.common import (
        outcome_failure,
        start_checkpoint,
        start_savepoint,
        stop_transition,
        take_checkpoint_result,
    )
    from sluice.workflows.states.upgrading import (
        complete_upgrade,
        settle_upgrade,
        start_upgrade_check,
        take_upgrade_check,
    )

if TYPE_CHECKING:
    from sluice.workflows.job import JobWorkflow

# A timer must be positive; a deadline already past fires (almost) at once.
MIN_TIMER_S = 0.001
# The checkpoint interval timer's summary (the UI shows it; tests find the timer by it).
CHECKPOINT_TIMER_SUMMARY = "checkpoint interval"


class Timer:
    """A durable timer as a task: `fired` is true once its TimerFired event is in history."""

    def __init__(self, seconds: float, summary: str) -> None:
        self.seconds = seconds
        self._task: asyncio.Task[None] = asyncio.ensure_future(
            workflow.sleep(max(seconds, MIN_TIMER_S), summary=summary)
        )

    @property
    def fired(self) -> bool:
        return self._task.done() and not self._task.cancelled()

    def cancel(self) -> None:
        if not self._task.done():
            self._task.cancel()


async def running(wf: JobWorkflow) -> None:
    if wf.monitor is None:
        wf.start_monitor(WATCH_ALL)
    checkpoint_timer = Timer(wf.carried.config.checkpoint_interval_s, CHECKPOINT_TIMER_SUMMARY)
    checkpoint_due = False
    ttl_timer = _ttl_timer(wf)
    ttl_s = wf.carried.config.ttl_s
    # The restart count resets after healthy_duration in Running (timed from entering it).
    healthy_timer = Timer(wf.carried.config.healthy_duration_s, "healthy duration") if wf.carried.restarts > 0 else None
    savepoint_timer = _savepoint_timer(wf)
    health_timer: Timer | None = None  # an upgrade's health window
    try:
        while True:
            up = wf.carried.upgrade
            if up is not None and up.phase == "switching":
                up.phase, up.switched_at = "health_window", workflow.now()
                wf.show_details()
            leaving = wf.stop_requested() or wf.restart_needed() or wf.rescale_needed() or (
                ttl_timer is not None and ttl_timer.fired
            )
            if leaving and wf.holding_output():
                # Leaving Running for a reason of the user's: the new generation was healthy so far.
                if not await settle_upgrade(wf, "healthy until the job left Running (stop, TTL or command)"):
                    return  # its last checkpoint failed: rolled back
            # Commands first: they are the user's intent, and they are never dropped.
            if wf.stop_requested():
                if wf.carried.config.stop != "checkpoint":
                    await wf.cancel(wf.inflight_checkpoint)
                    wf.inflight_checkpoint = None
                stop_transition(wf, f"stop {wf.carried.config.stop} requested", running=True)
                return
            if wf.restart_needed():
                wf.carried.restart_mode = wf.carried.config.restart_mode
                wf.transition("Restarting", f"restart requested ({wf.carried.config.restart_mode})")
                return
            if wf.rescale_needed():
                wf.transition("Rescaling", f"parallelism changed to {wf.desired_parallelism()}")
                return
            if ttl_timer is not None and ttl_timer.fired:
                await wf.cancel(wf.inflight_checkpoint)
                wf.inflight_checkpoint = None
                wf.carried.stop_mode = "immediate"
                wf.transition("Stopping", f"TTL of {wf.carried.config.ttl_s:g} s expired")
                return

            if wf.monitor is not None and wf.monitor.done():
                outcome = wf.monitor_outcome()
                if outcome.kind in ("sources_finished", "all_finished"):
                    if wf.holding_output() and not await settle_upgrade(wf, "healthy until its sources finished"):
                        return  # its last checkpoint failed: rolled back
                    wf.transition("Finishing", "all sources finished")
                    return
                await wf.cancel(wf.inflight_checkpoint)
                wf.inflight_checkpoint = None
                failure = outcome_failure(outcome)
                if outcome.kind == "task_failed" and not outcome.retryable:
                    wf.carried.failure = failure
                    wf.transition("Failing", f"task failed (not retryable): {outcome.message}")
                else:
                    wf.carried.last_error = failure
                    wf.transition("Recovering", f"{outcome.kind.replace('_', ' ')}: {outcome.message}")
                return

            if wf.inflight_checkpoint is not None and wf.inflight_checkpoint.done():
                problem = take_checkpoint_result(wf)
                if problem and not problem.retryable:
                    wf.carried.failure = problem.failure
                    wf.transition("Failing", f"task failed (not retryable): {problem.failure.message}")
                    return
                if problem:
                    wf.carried.last_error = problem.failure
                    wf.transition("Recovering", problem.failure.message)
                    return
                wf.show_details()

            if up is not None and up.active:
                if up.phase == "checking" and wf.upgrade_check is None:
                    start_upgrade_check(wf)
                if wf.upgrade_check is not None and wf.upgrade_check.done():
                    take_upgrade_check(wf)
                if up.phase == "savepoint":  # compatible (and approved): switch
                    wf.transition(
                        "Upgrading", f"upgrade {up.number} to pipeline version {up.to_version} ({up.mode})"
                    )
                    return
                if up.phase == "health_window":
                    if health_timer is None:
                        assert up.switched_at is not None
                        # Only the timer's length uses the clock; the window ends when it fires.
                        left = up.health_window_s - (workflow.now() - up.switched_at).total_seconds()
                        health_timer = Timer(left, f"upgrade {up.number} health window")
                    # Healthy: the window is over, a checkpoint completed, none is in flight.
                    if health_timer.fired and up.deferred_epochs and wf.inflight_checkpoint is None:
                        await complete_upgrade(
                            wf, f"healthy for {up.health_window_s:g} s, {len(up.deferred_epochs)} checkpoints"
                        )
                        wf.show_details()

            if healthy_timer is not None and healthy_timer.fired:
                healthy_timer = None
                if wf.carried.restarts > 0:
                    workflow.logger.info("job %s healthy for %g s: restart count reset", wf.job_id,
                                         wf.carried.config.healthy_duration_s)
                    wf.carried.restarts = 0
                    wf.carried.failure_streak = 0
                    wf.show_details()

            # A changed interval or TTL takes effect from the moment it was changed.
            if wf.carried.config.checkpoint_interval_s != checkpoint_timer.seconds and not checkpoint_timer.fired:
                checkpoint_timer.cancel()
                checkpoint_timer = Timer(wf.carried.config.checkpoint_interval_s, CHECKPOINT_TIMER_SUMMARY)
            if wf.carried.config.ttl_s != ttl_s:
                if ttl_timer is not None:
                    ttl_timer.cancel()
                ttl_timer, ttl_s = _ttl_timer(wf), wf.carried.config.ttl_s
                continue  # a TTL already past fires at once: look again from the top

            if savepoint_timer is not None and savepoint_timer.fired:
                savepoint_timer = _savepoint_timer(wf)
                if not wf.savepoints.periodic_pending() and not wf.upgrade_active():
                    wf.savepoints.add(None, periodic=True)
            if checkpoint_timer.fired:
                checkpoint_due = True
                checkpoint_timer = Timer(wf.carried.config.checkpoint_interval_s, CHECKPOINT_TIMER_SUMMARY)
            if wf.inflight_checkpoint is None and wf.savepoints.queue:
                # A savepoint is a checkpoint too (it counts as a due one), and it goes before a
                # continue-as-new, which would otherwise wait for its update forever.
                checkpoint_due = False
                start_savepoint(wf)
            if wf.inflight_checkpoint is None and wf.upgrade_check is None:
                if wf.continue_as_new_due():
                    await wf.continue_as_new()
                if checkpoint_due:
                    checkpoint_due = False
                    start_checkpoint(wf, then_stop=False)

            seen = wf.commands_seen
            monitor, inflight, check = wf.monitor, wf.inflight_checkpoint, wf.upgrade_check
            # A fired health timer stays fired until a checkpoint completes: it must not wake the loop.
            window = health_timer if health_timer is not None and not health_timer.fired else None
            timers = [t for t in (checkpoint_timer, ttl_timer, healthy_timer, savepoint_timer, window) if t is not None]
            await workflow.wait_condition(
                # The predicate reads this iteration's locals: it is awaited before the loop goes on.
                lambda: wf.commands_seen != seen  # noqa: B023
                or (monitor is not None and monitor.done())  # noqa: B023
                or (inflight is not None and inflight.done())  # noqa: B023
                or (check is not None and check.done())  # noqa: B023
                or any(t.fired for t in timers)  # noqa: B023
            )
    finally:
        for t in (checkpoint_timer, ttl_timer, healthy_timer, savepoint_timer, health_timer):
            if t is not None:
                t.cancel()


def _ttl_timer(wf: JobWorkflow) -> Timer | None:
    """The TTL counts from the job's first Running (kept across restarts and continue-as-new)."""
    if wf.carried.config.ttl_s is None or wf.carried.started_at is None:
        return None
    # Only the timer's length uses the clock: whether the TTL expired is decided by its firing.
    deadline = wf.carried.started_at + timedelta(seconds=wf.carried.config.ttl_s)
    return Timer((deadline - workflow.now()).total_seconds(), "TTL")


def _savepoint_timer(wf: JobWorkflow) -> Timer | None:
    """The next periodic savepoint (JobConfig.savepoint_interval_s), counted from entering Running."""
    interval = wf.carried.config.savepoint_interval_s
    return Timer(interval, "savepoint interval") if interval else None

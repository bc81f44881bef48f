"""Scheduling on runner hosts: reserve slots in the host registry, then start the runners on
each chosen host through its own task queue.

No free slot is not a failure: the job stays in Scheduling with the reason in its status and the
UI, and asks again when the registry signals that slots were freed or a host joined (and at
least every PLACEMENT_RECHECK). Every step is an activity or a signal in history.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TYPE_CHECKING

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from sluice.activities.placing import PlacingActivities
    from sluice.engine.compiler import runners_needed
    from sluice.hosts.contracts import HOST_START_RUNNERS, HostStartInput, Placement, PlaceRequest
    from sluice.models import RunnerInfo
    from sluice.workflows import constants as C
    from sluice.workflows.states.common import cause_of

if TYPE_CHECKING:
    from sluice.workflows.job import JobWorkflow


class PlacementFailed(Exception):
    """Starting the placed runners failed on a host (the message names it)."""


async def place_runners(wf: JobWorkflow) -> Placement | None:
    """Reserve runner slots for the new generation; None if a stop was requested meanwhile."""
    assert wf.carried.program is not None
    count = runners_needed(wf.carried.program, wf.carried.config.slots_per_runner)
    request = PlaceRequest(
        job_id=wf.job_id, generation=wf.carried.generation, runners=count, labels=wf.spec.pipeline.host_labels
    )
    while True:
        placement: Placement = await workflow.execute_activity_method(
            PlacingActivities.place_runners,
            request,
            start_to_close_timeout=C.PLACE_TIMEOUT,
            retry_policy=C.PLACE_RETRY,
            summary=f"place {count} runners of generation {wf.carried.generation}",
        )
        if placement.shares:
            if wf.waiting_for is not None:
                wf.waiting_for = None
                wf.show_details()
            return placement
        reason = placement.waiting_reason or "no free runner slot"
        if wf.waiting_for != f"no free runner slot: {reason}":
            wf.waiting_for = f"no free runner slot: {reason}"
            workflow.logger.info("job %s waits in Scheduling: %s", wf.job_id, reason)
            wf.show_details()
        seen = wf.slots_freed_seen
        try:
            await workflow.wait_condition(
                lambda: wf.slots_freed_seen != seen or wf.stop_requested(),  # noqa: B023 - awaited in this iteration
                timeout=C.PLACEMENT_RECHECK,
                timeout_summary="ask again for runner slots",
            )
        except TimeoutError:
            pass
        if wf.stop_requested():
            wf.waiting_for = None
            return None


async def start_placed_runners(wf: JobWorkflow, placement: Placement) -> list[RunnerInfo]:
    """Start every share on its host (in parallel); the runners, in index order. Raises
    PlacementFailed naming each host that failed (the runners started elsewhere are recorded,
    so a teardown reaches them)."""
    for share in placement.shares:
        wf.carried.runner_hosts[share.host_id] = share.task_queue
    startup = timedelta(seconds=wf.carried.config.runner_startup_timeout_s)
    results = await asyncio.gather(
        *(
            workflow.execute_activity(
                HOST_START_RUNNERS,
                HostStartInput(
                    job_id=wf.job_id,
                    generation=wf.carried.generation,
                    count=share.runners,
                    first_index=share.first_index,
                    slots_per_runner=wf.carried.config.slots_per_runner,
                    startup_timeout_s=wf.carried.config.runner_startup_timeout_s,
                    hang_timeout_s=wf.carried.config.runner_heartbeat_timeout_s,
                ),
                result_type=list[RunnerInfo],
                task_queue=share.task_queue,
                schedule_to_start_timeout=C.HOST_PICKUP_TIMEOUT,
                start_to_close_timeout=startup + C.HOST_START_MARGIN,
                retry_policy=C.HOST_ACTIVITY_RETRY,
                summary=f"start {share.runners} runners on host {share.host_id}",
            )
            for share in placement.shares
        ),
        return_exceptions=True,
    )
    runners: list[RunnerInfo] = []
    problems: list[str] = []
    for share, result in zip(placement.shares, results):
        if isinstance(result, BaseException):
            problems.append(f"host {share.host_id}: {cause_of(result)}")
        else:
            runners.extend(result)
    runners.sort(key=lambda r: int(r.runner_id.rpartition("-r")[2] or 0))
    if problems:
        wf.carried.runners = runners
        raise PlacementFailed("; ".join(problems))
    return runners

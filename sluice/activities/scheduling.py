"""Schedule and start execution: runners for a new generation, then every subtask started."""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.exceptions import ApplicationError

from sluice.activities.context import ControllerContext, heartbeating, user_error
from sluice.connectors import sink_class
from sluice.engine.compiler import assign, runners_needed
from sluice.errors import RunnerRefused, RunnerUnavailable
from sluice.models import RunnerInfo, ScheduleInput, StartExecutionInput, StartRequest
from sluice.runner.client import RunnerRequestRefused
from sluice.schedulers import RunnerStartError
from sluice.storage import CheckpointStore


class SchedulingActivities:
    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx

    @activity.defn(name="schedule_runners")
    async def schedule_runners(self, inp: ScheduleInput) -> list[RunnerInfo]:
        sched = self.ctx.scheduler
        # Fence: nothing of an older generation may keep running, nor leftovers of a failed attempt.
        await sched.stop_runners(inp.job_id, below_generation=inp.generation)
        await sched.stop_runners(inp.job_id, generation=inp.generation)
        count = runners_needed(inp.program, inp.slots_per_runner)
        try:
            return await sched.start_runners(
                inp.job_id, inp.generation, count, inp.slots_per_runner, inp.startup_timeout_s
            )
        except RunnerStartError as e:
            raise ApplicationError(f"runners of generation {inp.generation} did not start: {e}") from None

    @activity.defn(name="start_execution")
    async def start_execution(self, inp: StartExecutionInput) -> None:
        store = CheckpointStore(inp.checkpoint_url, inp.job_id)
        manifest = None
        if inp.restore_epoch:
            manifest = await asyncio.to_thread(store.read_manifest, inp.restore_epoch)
            if manifest is None:
                raise user_error(
                    f"checkpoint epoch {inp.restore_epoch} of job {inp.job_id!r} is missing from "
                    f"{inp.checkpoint_url}; restart with ignore_state to start fresh"
                )
        # Finish the restore point's commit phase and drop output of epochs that never completed,
        # before any task can write new output.
        for op_id, params in inp.program.operators.items():
            sink = sink_class(params)
            if sink is not None:
                await asyncio.to_thread(sink.recover, params, manifest)
        assignments = assign(inp.program, inp.runners)
        by_runner = {a.runner_id: a for a in assignments}
        async with heartbeating(), self.ctx.runner_clients(inp.job_id, inp.generation, inp.runners) as clients:
            try:
                await asyncio.gather(
                    *(
                        c.start(
                            StartRequest(
                                job_id=inp.job_id,
                                generation=inp.generation,
                                program=inp.program,
                                subtasks=by_runner[r.runner_id].subtasks if r.runner_id in by_runner else [],
                                checkpoint_url=inp.checkpoint_url,
                                restore=manifest,
                                peers=inp.runners,
                                assignments=assignments,
                                task_hang_timeout_s=inp.task_hang_timeout_s,
                            )
                        )
                        for c, r in zip(clients, inp.runners)
                    )
                )
            except RunnerRequestRefused as e:
                if e.domain == "user" and e.retryable is False:
                    raise user_error(f"starting tasks failed: {e.message}") from None
                raise ApplicationError(f"starting tasks failed: {e.message}") from None
            except (RunnerRefused, RunnerUnavailable) as e:
                raise ApplicationError(f"starting tasks failed: {e}") from None

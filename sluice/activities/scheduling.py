"""Schedule and start execution: runners for a new generation, then every subtask started."""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.exceptions import ApplicationError

from sluice.activities.context import ControllerContext, heartbeating, user_error
from sluice.activities.fencing import raise_generation_fence
from sluice.activities.restoring import corrupt_checkpoint_error, restore_point
from sluice.activities.sinks import recover_sinks
from sluice.engine.compiler import assign, runners_needed
from sluice.errors import CorruptCheckpointError, RunnerRefused, RunnerUnavailable
from sluice.models import RunnerInfo, ScheduleInput, StartExecutionInput, StartRequest
from sluice.runner.client import RunnerClient, RunnerRequestRefused
from sluice.schedulers import RunnerStartError
from sluice.storage import CheckpointProblem, CheckpointStore


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
            # Verified before anything uses it (sink recovery publishes its commits, runners read
            # its state): a corrupt restore point fails the job at once, naming the file, instead
            # of every new generation failing on it again.
            async with heartbeating(lambda: {"verifying epoch": inp.restore_epoch}):
                manifest = await asyncio.to_thread(restore_point, store, inp.restore_epoch)
            if manifest is not None and inp.drop_state:
                # An upgrade allowed these operators to start empty: their old state stays behind
                # (their pending commits stay: those are output, published by sink recovery).
                emptied = {
                    op: part.model_copy(update={"state_files": [], "state_digests": {}})
                    for op, part in manifest.operators.items()
                    if op in inp.drop_state
                }
                manifest = manifest.model_copy(update={"operators": {**manifest.operators, **emptied}})
        # Fence before sink recovery and before any task starts: from here on the store refuses
        # every publish of an older generation (refused itself if a newer one already started).
        await raise_generation_fence(store, inp.generation)
        assignments = assign(inp.program, inp.runners)
        by_runner = {a.runner_id: a for a in assignments}
        async with heartbeating(), self.ctx.runner_clients(inp.job_id, inp.generation, inp.runners) as clients:
            # Finish the restore point's commit phase and drop output of epochs that never
            # completed, before any task can write new output (only where this job still owns the
            # destination). A retry after a lost worker may find tasks of this generation already
            # writing: recovery then already ran, and running it again would delete their files.
            if activity.info().attempt == 1 or not await _any_start_requested(clients):
                await asyncio.to_thread(recover_sinks, inp.program, inp.job_id, manifest)
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
                corrupt = CorruptCheckpointError.parse(e.message) if e.retryable is False else None
                if corrupt is not None:  # a runner could not read what verification passed
                    problem = CheckpointProblem(corrupt.epoch, corrupt.file, corrupt.problem, corrupt.what)
                    raise await asyncio.to_thread(corrupt_checkpoint_error, store, [problem]) from None
                raise ApplicationError(f"starting tasks failed: {e.message}") from None
            except (RunnerRefused, RunnerUnavailable) as e:
                raise ApplicationError(f"starting tasks failed: {e}") from None


async def _any_start_requested(clients: list[RunnerClient]) -> bool:
    """Whether any runner of the generation was already asked to start its tasks."""
    try:
        answers = await asyncio.gather(*(c.health() for c in clients))
    except (RunnerRefused, RunnerUnavailable, RunnerRequestRefused) as e:
        raise ApplicationError(f"starting tasks failed: {e}") from None
    return any(a.get("start_requested") or a.get("tasks") for a in answers)

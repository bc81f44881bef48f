"""Compile: validate the pipeline and produce the physical program; find the restore point; claim
the sinks' destinations for the job (a destination another job owns fails the job here)."""

from __future__ import annotations

import asyncio

from temporalio import activity

from sluice.activities.context import ControllerContext, user_error
from sluice.activities.sinks import claim_sinks
from sluice.engine.compiler import compile_program
from sluice.errors import UserError
from sluice.models import CompileInput, CompileResult, UpgradeCheckInput, UpgradeCheckResult
from sluice.savepoints import SavepointError, copy_savepoint_into, split_ref
from sluice.storage import CheckpointStore
from sluice.upgrades import check_compatibility


class CompileActivities:
    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx

    @activity.defn(name="compile_program")
    async def compile_program(self, inp: CompileInput) -> CompileResult:
        spec = inp.spec
        try:
            program = await asyncio.to_thread(compile_program, spec.pipeline, spec.config)
        except UserError as e:
            raise user_error(str(e)) from None
        url = spec.checkpoint_url or self.ctx.default_checkpoint_url
        store = CheckpointStore(url, spec.job_id)
        # Completed = has a manifest file; it is not parsed here. A corrupt newest checkpoint stays
        # the restore point, so start_execution's verification reports it (epoch, file, problem)
        # instead of the job silently restoring an older epoch and committing its output twice.
        completed = await asyncio.to_thread(store.completed_epochs)
        ref = spec.config.from_savepoint
        if ref is not None and not completed and not spec.config.ignore_state:
            # The job's first start: its state comes from the savepoint (its own checkpoints
            # win from then on). A copy, so that disposing the savepoint later cannot break it.
            await asyncio.to_thread(self._copy_savepoint, ref, url, store)
            completed = await asyncio.to_thread(store.completed_epochs)
        highest = await asyncio.to_thread(store.highest_epoch_seen)
        wanted = spec.config.restore_epoch
        if wanted is not None and wanted not in completed:
            shown = ", ".join(map(str, completed[-10:])) or "none"
            raise user_error(
                f"restore_epoch {wanted}: no completed checkpoint with that epoch for job "
                f"{spec.job_id!r} in {url} (completed: {shown})"
            )
        # Last, so that a job refused for another reason claims nothing: from here on the sink
        # destinations are this job's (a second job on one of them is refused right here).
        await asyncio.to_thread(claim_sinks, program, spec.job_id)
        return CompileResult(
            program=program,
            checkpoint_url=url,
            latest_epoch=completed[-1] if completed else 0,
            highest_epoch=max(highest, completed[-1] if completed else 0),
        )

    @activity.defn(name="check_upgrade")
    async def check_upgrade(self, inp: UpgradeCheckInput) -> UpgradeCheckResult:
        """Compile the upgrade's new pipeline and compare its state with the running program's.
        Claims nothing and touches no store: a refused upgrade leaves no trace but its verdict.
        An invalid pipeline is a non-retryable user error naming the file's field."""
        try:
            program = await asyncio.to_thread(compile_program, inp.spec.pipeline, inp.spec.config)
        except UserError as e:
            raise user_error(f"the new pipeline is invalid: {e}") from None
        verdict = check_compatibility(inp.program, program, inp.allow_drop_state)
        return UpgradeCheckResult(program=program, problems=verdict.problems, dropped_state=verdict.dropped_state)

    @staticmethod
    def _copy_savepoint(ref: str, url: str, store: CheckpointStore) -> None:
        try:
            source_job, name = split_ref(ref)
            copy_savepoint_into(CheckpointStore(url, source_job), name, store)
        except SavepointError as e:
            raise user_error(f"from_savepoint {ref}: {e}") from None

"""Checkpoint and cleanup: barriers, snapshots, the manifest (commit point), the commit phase."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from temporalio import activity
from temporalio.exceptions import ApplicationError

from sluice.activities.context import ControllerContext, heartbeating
from sluice.activities.fencing import stale_generation_error
from sluice.activities.sinks import commit_sinks
from sluice.activities.stopping import wait_all_finished
from sluice.controller_metrics import record_checkpoint
from sluice.errors import RunnerRefused, RunnerUnavailable, StaleGeneration
from sluice.models import (
    CheckpointInfo,
    CheckpointInput,
    CleanupInput,
    CommitEpochsInput,
    SubtaskSnapshot,
)
from sluice.savepoints import protected_epochs, prune_periodic, savepoint_taken, write_savepoint
from sluice.storage import CheckpointStore, manifest_from_snapshots
from sluice.workflows.constants import SAVEPOINT_EXISTS_TYPE, TASK_FAILED_TYPE

if TYPE_CHECKING:
    from sluice.runner.client import RunnerClient

# Each long-poll for snapshots is this long, so heartbeats and cancellation stay prompt.
WAIT_POLL_S = 2.0


class CheckpointActivities:
    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx

    @activity.defn(name="checkpoint")
    async def checkpoint(self, inp: CheckpointInput) -> CheckpointInfo:
        """Take checkpoint `inp.epoch`: barriers, snapshots, the manifest (the commit point), then
        the sinks' commit phase. The manifest and every committed file are published only while
        the store's fence admits `inp.generation`; otherwise the activity fails, not retried, with
        the fence's message ("generation G of job J is superseded by generation F: refused")."""
        started = time.monotonic()
        store = CheckpointStore(inp.checkpoint_url, inp.job_id)
        if inp.savepoint is not None and await asyncio.to_thread(savepoint_taken, store, inp.savepoint, inp.epoch):
            raise ApplicationError(
                f"job {inp.job_id} already has a savepoint named {inp.savepoint!r}: choose another name "
                f"or dispose of it first (`sluice savepoint {inp.job_id} --dispose {inp.savepoint}`)",
                type=SAVEPOINT_EXISTS_TYPE, non_retryable=True,
            )  # fmt: skip
        manifest = await asyncio.to_thread(store.read_manifest, inp.epoch)
        progress = {"epoch": inp.epoch, "phase": "barriers"}
        async with heartbeating(lambda: progress), self.ctx.runner_clients(
            inp.job_id, inp.generation, inp.runners
        ) as clients:
            try:
                if manifest is None:  # a retry after the manifest was written goes straight to commit
                    # Barrier injection is idempotent per epoch, so a retried attempt rejoins it.
                    await asyncio.gather(*(c.checkpoint(inp.epoch, inp.then_stop) for c in clients))
                    progress["phase"] = "snapshots"
                    snapshots = await self._collect(clients, inp.epoch)
                    progress["phase"] = "manifest"
                    manifest = manifest_from_snapshots(
                        job_id=inp.job_id,
                        epoch=inp.epoch,
                        generation=inp.generation,
                        program=inp.program,
                        snapshots=snapshots,
                        then_stop=inp.then_stop,
                    )
                    # Refused (StaleGeneration, nothing published) once a newer generation started.
                    await asyncio.to_thread(store.write_manifest, manifest)
                committed = 0
                if not inp.defer_commit:  # held back: an upgrade's health window (commit_epochs)
                    progress["phase"] = "commit"
                    committed = await asyncio.to_thread(
                        commit_sinks, inp.program, inp.job_id, manifest,
                        before_publish=lambda: store.check_fence(inp.generation),
                    )
                savepoint = None
                if inp.savepoint is not None:
                    progress["phase"] = "savepoint"
                    savepoint = await asyncio.to_thread(
                        write_savepoint, store, inp.savepoint, manifest,
                        pipeline_name=inp.program.name, version=inp.pipeline_version,
                    )  # fmt: skip
                if inp.retention is not None:
                    progress["phase"] = "retention"
                    await self._retention_best_effort(inp.retention)
                if inp.then_stop:
                    progress["phase"] = "tasks finishing"
                    await wait_all_finished(clients, inp.finish_timeout_s)
            except (RunnerUnavailable, RunnerRefused) as e:
                raise ApplicationError(f"checkpoint epoch {inp.epoch}: {e}") from None
            except StaleGeneration as e:
                # Superseded: retrying cannot help. The workflow recovers (into a generation that
                # the fence admits); a commit cut short here is finished by that recovery.
                raise stale_generation_error(e) from None
        duration_s = time.monotonic() - started
        record_checkpoint(inp.job_id, manifest, duration_s, committed)
        return CheckpointInfo(
            epoch=inp.epoch,
            manifest_path=store.manifest_path(inp.epoch),
            then_stop=inp.then_stop,
            duration_s=duration_s,
            committed_files=committed,
            savepoint=savepoint,
        )

    async def _collect(self, clients: list[RunnerClient], epoch: int) -> list[SubtaskSnapshot]:
        async def one(client: RunnerClient) -> list[SubtaskSnapshot]:
            while True:
                result = await client.wait_checkpoint_result(epoch, WAIT_POLL_S)
                task = result.failed_task
                if task is not None and task.message:
                    # Not retried: the subtask is dead; the job recovers (or fails) from it.
                    raise ApplicationError(
                        task.message,
                        {
                            "operator": task.operator,
                            "traceback": task.traceback,
                            "domain": task.domain,
                            "retryable": task.retryable,
                            "subtask": task.subtask.label() if task.subtask else None,
                            "runner_id": client.info.runner_id,
                        },
                        type=TASK_FAILED_TYPE,
                        non_retryable=True,
                    )
                if result.failed:
                    raise ApplicationError(
                        f"checkpoint epoch {epoch} failed on runner {client.info.runner_id}: {result.failed}"
                    )
                if result.done:
                    return result.snapshots

        return [s for part in await asyncio.gather(*(one(c) for c in clients)) for s in part]

    @staticmethod
    async def _retention_best_effort(inp: CleanupInput) -> None:
        """Retention as part of a checkpoint: a failure to delete never fails the checkpoint
        (the next one tries again)."""
        try:
            await apply_retention(inp)
        except Exception as e:  # noqa: BLE001 - see the docstring
            activity.logger.warning("checkpoint retention for job %s failed (retried next checkpoint): %s",
                                    inp.job_id, e)  # fmt: skip

    @activity.defn(name="commit_epochs")
    async def commit_epochs(self, inp: CommitEpochsInput) -> int:
        """The commit phase of checkpoints whose commit was held back (an upgrade's health
        window), oldest first. Idempotent (a retry republishes nothing), fenced like a checkpoint's
        own commit. Returns how many items were published."""
        store = CheckpointStore(inp.checkpoint_url, inp.job_id)
        published = 0
        try:
            async with heartbeating(lambda: {"epochs": inp.epochs}):
                for epoch in sorted(inp.epochs):
                    manifest = await asyncio.to_thread(store.read_manifest, epoch)
                    if manifest is None:
                        raise ApplicationError(f"commit of epoch {epoch}: its manifest is gone", non_retryable=True)
                    published += await asyncio.to_thread(
                        commit_sinks, inp.program, inp.job_id, manifest,
                        before_publish=lambda: store.check_fence(inp.generation),
                    )
        except StaleGeneration as e:
            raise stale_generation_error(e) from None
        return published

    @activity.defn(name="cleanup_checkpoints")
    async def cleanup_checkpoints(self, inp: CleanupInput) -> int:
        """Retention as its own activity (runs from before the lean-checkpoints patch)."""
        return await apply_retention(inp)


async def apply_retention(inp: CleanupInput) -> int:
    """Delete all but the newest `keep` checkpoints (and failed attempts older than them),
    never a protected epoch (the restore point) nor one that a savepoint names. Periodic
    savepoints beyond the newest `periodic_savepoints_to_keep` are disposed of first.
    Returns how many epoch directories were deleted."""
    store = CheckpointStore(inp.checkpoint_url, inp.job_id)
    completed = await asyncio.to_thread(store.completed_epochs)
    if not completed:
        return 0
    if inp.periodic_savepoints_to_keep is not None:
        await asyncio.to_thread(prune_periodic, store, inp.periodic_savepoints_to_keep)
    saved = await asyncio.to_thread(protected_epochs, store)
    kept = set(completed[-inp.keep :]) | set(inp.protect)
    # Savepoints are kept however old, without holding back the deletion of what lies between.
    oldest_kept = min(kept)
    seen = await asyncio.to_thread(store.epochs_seen)
    doomed = [e for e in seen if e < oldest_kept and e not in kept and e not in saved]
    await asyncio.to_thread(store.delete_epochs, doomed)
    return len(doomed)


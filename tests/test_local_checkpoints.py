"""Periodic checkpoints as local activities (runs with the `local-checkpoints` patch), end to end:
real dev server, in-process controller worker, real runner processes.

What a user would check: the history a checkpoint costs (at most 8 events, the issue's bound), a
stop sent while a long checkpoint runs is still handled (the workflow task that runs it is
heartbeated) and waits for it (stop checkpoint) or cancels it (stop immediate), and the Web UI's
current details name the checkpoint in flight, since it is no pending activity any more; a job
whose checkpoint timeout is longer than a workflow task may stay open keeps regular activities;
and the activity helper that heartbeats stays silent in a local activity.
A long checkpoint is made by holding the job's map (`tests.pipeline_functions:steered`, file
`hold-block`): its barrier waits behind a batch that does not return until the file is removed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowHistory
from temporalio.testing import ActivityEnvironment

from sluice.activities.context import HEARTBEAT_EVERY_S, heartbeating
from sluice.client import JobClient
from sluice.models import JobSpec
from sluice.workflows.constants import CHECKPOINT_LOCAL_MAX_TIMEOUT, PATCH_LOCAL_CHECKPOINTS
from tests.e2e_helpers import (
    describe_status,
    generator_pipeline,
    job_spec,
    manifest_epochs,
    read_manifest,
    stop_job_quietly,
    wait_status,
)
from tests.histories.corpus import (
    activity_summaries,
    is_local_activity_marker,
    local_activity_markers,
    patches,
)
from tests.histories.scenarios import HELD_HANG_TIMEOUT_S, STEERED, hold_local_checkpoint
from tests.pipeline_functions import FAULT_DIR_ENV, HOLD_BLOCK_FILE

pytestmark = pytest.mark.usefixtures("worker")

START_TIMEOUT_S = 60.0
# A command sent during a local checkpoint reaches the workflow at the next workflow-task
# heartbeat (8 s with the default 10 s task timeout); this leaves room for a loaded machine.
COMMAND_DURING_CHECKPOINT_S = 30.0
MAX_EVENTS_PER_CHECKPOINT = 8  # the bound


def _spec(state_dir: Path, name: str, *, steered: bool) -> JobSpec:
    pipeline = generator_pipeline(
        name, state_dir / "out", splits=1, limit=None, rate=100.0, keys=8,
        transforms=(("map", STEERED),) if steered else (),
    )  # fmt: skip
    return job_spec(pipeline, state_dir, checkpoint_interval_s=1.0, task_hang_timeout_s=HELD_HANG_TIMEOUT_S)


async def _history(client: Client, job_id: str) -> WorkflowHistory:
    return await client.get_workflow_handle(job_id).fetch_history()


async def _current_details(client: Client, job_id: str) -> str:
    """What the Web UI shows as the job's current details (the SDK's metadata query)."""
    meta = await client.get_workflow_handle(job_id).query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    return meta.current_details


async def test_periodic_checkpoints_are_local_and_cost_at_most_8_events(
    client: Client, job_client: JobClient, state_dir: Path
) -> None:
    spec = _spec(state_dir, "local-cost", steered=False)
    await job_client.start(spec)
    try:
        await wait_status(
            job_client, spec.job_id, lambda s: s.epoch >= 6, timeout_s=START_TIMEOUT_S, what="6 checkpoints"
        )
        await job_client.stop(spec.job_id, "immediate")
        await wait_status(job_client, spec.job_id, lambda s: s.state == "Stopped", timeout_s=START_TIMEOUT_S,
                          what="Stopped")  # fmt: skip
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    history = await _history(client, spec.job_id)
    assert PATCH_LOCAL_CHECKPOINTS in patches(history)
    assert not activity_summaries(history, "checkpoint"), "a periodic checkpoint ran as a regular activity"
    markers = local_activity_markers(history)
    assert len(markers) >= 6 and markers[0] == ("checkpoint", "checkpoint epoch 1"), markers
    events = list(history.events)
    at = [i for i, e in enumerate(events) if is_local_activity_marker(e)]
    cycles = [b - a for a, b in zip(at, at[1:])]
    kinds = [[EventType.Name(e.event_type)[len("EVENT_TYPE_") :] for e in events[a:b]] for a, b in zip(at, at[1:])]
    # Six events a checkpoint; now and then one more workflow task (3 events) lands in a cycle
    # (this test polls the job's status all along): the bound holds on average.
    assert statistics.median(cycles) == 6 and statistics.mean(cycles) <= MAX_EVENTS_PER_CHECKPOINT, kinds


async def test_a_checkpoint_timeout_beyond_a_workflow_task_keeps_regular_activities(
    client: Client, job_client: JobClient, state_dir: Path
) -> None:
    spec = _spec(state_dir, "local-long-timeout", steered=False)
    spec.config.checkpoint_timeout_s = CHECKPOINT_LOCAL_MAX_TIMEOUT.total_seconds() + 1
    await job_client.start(spec)
    try:
        await wait_status(job_client, spec.job_id, lambda s: s.epoch >= 2, timeout_s=START_TIMEOUT_S,
                          what="2 checkpoints")  # fmt: skip
    finally:
        await stop_job_quietly(job_client, spec.job_id)
    history = await _history(client, spec.job_id)
    assert not local_activity_markers(history)
    assert activity_summaries(history, "checkpoint")[:2] == ["checkpoint epoch 1", "checkpoint epoch 2"]


@pytest.mark.parametrize("is_local", [False, True])
async def test_activities_heartbeat_unless_local(is_local: bool) -> None:
    """A regular activity heartbeats while it waits; a local one does not (the server knows
    nothing of it: the SDK would only log a failed heartbeat every second)."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(ActivityEnvironment.default_info(), is_local=is_local)
    beats: list[object] = []
    env.on_heartbeat = lambda *details: beats.append(details)

    async def waits() -> None:
        async with heartbeating(lambda: {"phase": "barriers"}):
            await asyncio.sleep(HEARTBEAT_EVERY_S * 1.5)

    await env.run(waits)
    assert beats == ([] if is_local else [({"phase": "barriers"},)] * 2), beats


@asynccontextmanager
async def _held_checkpoint(
    client: Client, job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> AsyncIterator[tuple[JobSpec, Path]]:
    """A Running job with a periodic local checkpoint in flight that cannot complete while the
    hold file (yielded with the spec) exists; the hold is released and the job stopped on exit."""
    faults = state_dir / "faults"
    monkeypatch.setenv(FAULT_DIR_ENV, str(faults))
    spec = _spec(state_dir, name, steered=True)
    await job_client.start(spec)
    hold = faults / spec.job_id / HOLD_BLOCK_FILE
    try:
        await hold_local_checkpoint(client, job_client, spec.job_id, faults)
        yield spec, hold
    finally:
        hold.unlink(missing_ok=True)
        await stop_job_quietly(job_client, spec.job_id)


async def test_stop_checkpoint_during_a_long_local_checkpoint_waits_for_it(
    client: Client, job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _held_checkpoint(client, job_client, state_dir, monkeypatch, "local-stop-checkpoint") as (spec, hold):
        await job_client.stop(spec.job_id, "checkpoint")
        # Handled while the checkpoint still runs (it cannot finish: the hold is in place).
        stopping = await wait_status(job_client, spec.job_id, lambda s: s.state == "CheckpointStopping",
                                     timeout_s=COMMAND_DURING_CHECKPOINT_S, what="CheckpointStopping")  # fmt: skip
        details = await _current_details(client, spec.job_id)
        in_flight = stopping.epoch + 1
        assert f"checkpoint epoch {in_flight} in progress" in details and "CheckpointStopping" in details, details
        assert in_flight not in manifest_epochs(state_dir, spec.job_id)
        hold.unlink()
        stopped = await wait_status(job_client, spec.job_id, lambda s: s.state == "Stopped",
                                    timeout_s=START_TIMEOUT_S, what="Stopped")  # fmt: skip
    # The periodic checkpoint completed, then the final one.
    assert stopped.epoch == in_flight + 1, describe_status(stopped)
    assert not read_manifest(state_dir, spec.job_id, in_flight)["then_stop"]
    assert read_manifest(state_dir, spec.job_id, stopped.epoch)["then_stop"]
    assert "in progress" not in await _current_details(client, spec.job_id)


async def test_stop_immediate_during_a_long_local_checkpoint_cancels_it(
    client: Client, job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _held_checkpoint(client, job_client, state_dir, monkeypatch, "local-stop-immediate") as (spec, hold):
        await job_client.stop(spec.job_id, "immediate")
        # Stopped while the hold is still in place: the checkpoint was cancelled, not waited for.
        stopped = await wait_status(job_client, spec.job_id, lambda s: s.state == "Stopped",
                                    timeout_s=COMMAND_DURING_CHECKPOINT_S, what="Stopped")  # fmt: skip
        assert hold.exists()
    # The epoch in flight never got a manifest; the job's restore point is the one before it.
    assert manifest_epochs(state_dir, spec.job_id)[-1] == stopped.epoch, describe_status(stopped)
    assert stopped.transitions[-2].reason == "stop immediate requested", describe_status(stopped)

"""Rows of the transition table that need a job held in a particular state or a fault injected."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError

from sluice.client import JobClient, JobFailedError
from sluice.models import TASK_QUEUE, JobInput
from tests.test_lifecycle import WAIT_S, _ended, _path, _search_state, _spec, _status_when

pytestmark = pytest.mark.usefixtures("worker")


async def test_stop_before_scheduling(job_client: JobClient, state_dir: Path) -> None:
    """A stop in the job's first workflow task is seen in Compiling: nothing is ever scheduled."""
    spec = _spec(state_dir)
    await job_client.client.start_workflow(
        "JobWorkflow",
        JobInput(spec=spec),
        id=spec.job_id,
        task_queue=TASK_QUEUE,
        start_signal="stop",
        start_signal_args=[{"mode": "checkpoint"}],
    )
    status = await _ended(job_client, spec.job_id, "Stopped")
    assert _path(status) == ["Created", "Compiling", "Stopping", "Stopped"]
    assert status.generation == 0 and status.runners == []


async def test_unreachable_checkpoint_store_recovers_then_fails(job_client: JobClient, state_dir: Path) -> None:
    # An HDFS store on a closed loopback port: every listing fails (an internal, retryable error).
    spec = _spec(state_dir, allowed_restarts=0).model_copy(update={"checkpoint_url": "hdfs://127.0.0.1:1/ckpt"})
    await job_client.start(spec)
    with pytest.raises(JobFailedError, match="compile failed"):
        await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    status = await job_client.status(spec.job_id)
    assert _path(status) == ["Created", "Compiling", "Recovering", "Failing", "Failed"]
    assert status.failure is not None and status.failure.domain == "internal"


async def test_non_retryable_task_failure_fails_without_restarts(job_client: JobClient, state_dir: Path) -> None:
    spec = _spec(state_dir, fn="tests.pipeline_functions:rejects_input")
    await job_client.start(spec)
    with pytest.raises(JobFailedError, match="refuses"):
        await job_client.wait_for_state(spec.job_id, ["Stopped"], timeout_s=WAIT_S)
    status = await job_client.status(spec.job_id)
    assert _path(status)[-3:] == ["Running", "Failing", "Failed"]
    assert status.restarts == 0
    assert status.failure is not None and status.failure.domain == "user"
    assert await _search_state(job_client, spec.job_id) == "Failed"


async def _hold_in(job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch, state: str):
    """A job whose final checkpoint waits behind 1.5 s batches, caught in Rescaling or Restarting."""
    monkeypatch.setenv("SLUICE_TEST_SLOW_BATCH", "1.5")
    spec = _spec(state_dir, fn="tests.pipeline_functions:slow_batches", rate=50.0, slots_per_runner=1)
    await job_client.start(spec)
    first = await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    if state == "Rescaling":
        await job_client.rescale(spec.job_id, parallelism=2)
    else:
        await job_client.restart(spec.job_id)
    await job_client.wait_for_state(spec.job_id, [state], timeout_s=WAIT_S)
    return spec, first


@pytest.mark.parametrize("state", ["Rescaling", "Restarting"])
async def test_stop_during_final_checkpoint_of(
    job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    spec, _ = await _hold_in(job_client, state_dir, monkeypatch, state)
    await job_client.stop(spec.job_id, "force")
    status = await _ended(job_client, spec.job_id, "Stopped")
    assert _path(status)[-3:] == [state, "Stopping", "Stopped"]


@pytest.mark.parametrize("state", ["Rescaling", "Restarting"])
async def test_runner_lost_during_final_checkpoint_of(
    job_client: JobClient, state_dir: Path, monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    spec, first = await _hold_in(job_client, state_dir, monkeypatch, state)
    os.kill(first.runners[0].pid, signal.SIGKILL)  # type: ignore[arg-type]  # a runner this job started
    status = await _status_when(
        job_client, spec.job_id, lambda s: s.state == "Running" and s.generation > first.generation
    )
    path = _path(status)
    i = path.index(state)
    assert path[i : i + 5] == [state, "Recovering", "Compiling", "Scheduling", "Running"]
    assert "runner lost" in status.transitions[i].reason
    if state == "Rescaling":  # the rescale still happens, through recovery
        assert status.parallelism["events"] == 2
    await job_client.stop(spec.job_id, "force")
    await _ended(job_client, spec.job_id, "Stopped")


async def test_function_missing_on_runners_fails_while_scheduling(job_client: JobClient, state_dir: Path) -> None:
    spec = _spec(state_dir, fn="tests.runner_import_error:identity")
    await job_client.start(spec)
    with pytest.raises(JobFailedError, match="geo_lookup"):
        await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    status = await job_client.status(spec.job_id)
    assert _path(status) == ["Created", "Compiling", "Scheduling", "Failing", "Failed"]
    assert status.restarts == 0
    assert status.failure is not None and status.failure.domain == "user"
    assert "step" in status.failure.message  # names the operator


async def test_restore_epoch_abandons_later_checkpoints(job_client: JobClient, state_dir: Path) -> None:
    """Restoring an older checkpoint: a recovery before the next checkpoint goes back to it, never
    to the newer checkpoints of the abandoned lineage."""
    spec = _spec(state_dir, slots_per_runner=1)
    await job_client.start(spec)
    await _status_when(job_client, spec.job_id, lambda s: s.state == "Running" and s.epoch >= 3)
    await job_client.stop(spec.job_id, "immediate")
    await _ended(job_client, spec.job_id, "Stopped")
    # A new run of the same job from epoch 1, checkpointing too rarely to write a new one here.
    config = spec.config.model_copy(update={"restore_epoch": 1, "checkpoint_interval_s": 3600.0})
    await job_client.start(spec.model_copy(update={"config": config}))
    first = await job_client.wait_for_state(spec.job_id, ["Running"], timeout_s=WAIT_S)
    assert first.epoch == 1 and "restored epoch 1" in first.transitions[-1].reason
    os.kill(first.runners[0].pid, signal.SIGKILL)  # type: ignore[arg-type]  # a runner this job started
    again = await _status_when(
        job_client, spec.job_id, lambda s: s.state == "Running" and s.generation > first.generation
    )
    assert again.epoch == 1 and "restored epoch 1" in again.transitions[-1].reason
    await job_client.stop(spec.job_id, "force")
    await _ended(job_client, spec.job_id, "Stopped")


async def test_malformed_start_input_fails_the_job_naming_the_field(job_client: JobClient) -> None:
    """A start that bypasses the client (temporal CLI, raw JSON) with an invalid pipeline fails the
    job as a user error naming the field, instead of retrying a workflow task forever."""
    job_id = f"raw-invalid-{os.getpid()}-{os.urandom(3).hex()}"
    bad = {"spec": {"job_id": job_id, "pipeline": {"name": "p", "operators": [
        {"id": "a", "type": "generator", "parallelism": 0}]}}}
    handle = await job_client.client.start_workflow("JobWorkflow", bad, id=job_id, task_queue=TASK_QUEUE)
    with pytest.raises(WorkflowFailureError) as err:
        await asyncio.wait_for(handle.result(), WAIT_S)
    assert "spec.pipeline.operators.0.generator.parallelism" in str(err.value.cause)
    status = await job_client.status(job_id)
    assert _path(status) == ["Created", "Compiling", "Failing", "Failed"]
    assert status.failure is not None and status.failure.domain == "user"
